import pytest

from starling_jax.data.tokenizer import build_tokenizer, load_tokenizer
from starling_jax.errors import CheckpointError


def test_default_tokenizer(tok, tok_dir):
    assert len(tok) == 32000
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 0, 0)
    assert (tok_dir / "tokenizer.json").is_file()
    assert tok("Hello world").input_ids == [1, 22557, 1526]


def test_openchat_tokenizer(oc_tok):
    assert len(oc_tok) == 32002
    assert oc_tok.eos_token_id == 32000 and oc_tok.pad_token_id == 32001
    ids = oc_tok("a<|end_of_turn|>", add_special_tokens=False).input_ids
    assert ids[-1] == 32000


def test_build_into_folder(tmp_path):
    d = build_tokenizer(tmp_path / "t", "chatml")
    t = load_tokenizer(d)
    assert len(t) == 32000 and "im_start" in t.chat_template


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(tmp_path / "empty")
