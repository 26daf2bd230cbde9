"""Tokenizer and template provenance: prepared data, training and scoring must agree, or a one-line error."""

import json
import re
import shutil

import pytest
from conftest import good_row

from starling_jax import prepare_data, train_rm
from starling_jax.cli import DEFAULT_MAX_LENGTH
from starling_jax.data.pipeline import open_source
from starling_jax.data.tokenizer import (
    check_provenance,
    default_tokenizer_for,
    load_tokenizer,
    resolve_tokenizer_dir,
    tokenizer_fingerprint,
)
from starling_jax.errors import CheckpointError, DataError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok_dir):
    d = tmp_path_factory.mktemp("prov")
    f = d / "rows.jsonl"
    f.write_text("".join(json.dumps(good_row(i)) + "\n" for i in range(1, 9)))
    out = d / "prepared"
    assert (
        prepare_data.main(
            [
                "--input",
                str(f),
                "--output",
                str(out),
                "--tokenizer",
                str(tok_dir),
                "--max-length",
                "64",
                "--eval-fraction",
                "0",
            ]
        )
        == 0
    )
    return out


def test_report_and_metadata_record_provenance(prepared, tok):
    rep = json.loads((prepared / "report.json").read_text())
    p = rep["provenance"]
    assert p["template"] == "llama2_chat" and p["max_length"] == 64
    assert p["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert open_source(prepared, tokenizer=tok, template="llama2_chat", max_length=64).provenance == p


@pytest.mark.parametrize(
    "override,named",
    [
        ("data.template=chatml", ["template llama2_chat", "template chatml"]),
        ("data.max_length=128", ["max_length 64", "max_length 128"]),
        ("data.tokenizer=OC", ["mistral_v1-llama2_chat", "mistral_v1-openchat_3.5-openchat"]),
    ],
)
def test_train_rm_refuses_data_prepared_differently(prepared, override, named, tmp_path, capsys):
    if override.endswith("=OC"):
        override = f"data.tokenizer={default_tokenizer_for('openchat_3.5')}"
    rc = train_rm.main(
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={prepared}",
            "data.max_length=64",
            "data.eval_fraction=0",
            f"data.eval={prepared}",
            override,
            "train.steps=1",
        ]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(err) == 1, err
    for name in named:  # both sides are named
        assert name in err[0]


def test_the_differing_field_and_its_fix_come_first(prepared, tmp_path, capsys):
    """The message starts with what differs and how to fix it (either side), then both sides in full."""
    rc = train_rm.main(
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={prepared}",
            "data.max_length=128",
            "data.eval_fraction=0",
            f"data.eval={prepared}",
            "train.steps=1",
        ]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(err) == 1, err
    assert re.fullmatch(
        r"error: prepared dataset (\S+) and this run differ in max_length \(64 vs 128\): set "
        r"data\.max_length=64, or prepare the data again with --max-length 128\. prepared dataset "
        r"\1 was made with tokenizer .*, max_length 64; this run uses tokenizer .*, max_length 128",
        err[0],
    ), err[0]
    assert str(prepared) in err[0]
    with pytest.raises(DataError) as e:  # several fields: each named, each with its setting
        check_provenance(
            {"template": "llama2_chat", "template_sha256": "a", "max_length": 64},
            {"template": "chatml", "template_sha256": "b", "max_length": 128},
            "dataset D",
            "this run",
            settings={"template": "data.template", "max_length": "data.max_length"},
        )
    assert str(e.value).startswith(
        "dataset D and this run differ in template (llama2_chat vs chatml); max_length "
        "(64 vs 128): set data.template=llama2_chat, data.max_length=64, or prepare the "
        "data again with --template chatml --max-length 128. dataset D was made with "
    )


def test_prepare_data_defaults_chain_into_train_rm(tmp_path):
    """`prepare_data` with its defaults → `train_rm data.train=...` with its defaults: the same max_length (one
    constant), tokenizer and template, so the documented chain is not refused."""
    from starling_jax.train.job import resolve_tokenizer_dir
    from starling_jax.train.rm_config import RMRunConfig

    cfg = RMRunConfig()
    assert prepare_data.parse_args([]).max_length == cfg.data.max_length == DEFAULT_MAX_LENGTH
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(good_row(i)) + "\n" for i in range(1, 9)))
    out = tmp_path / "prepared"
    assert prepare_data.main(["--input", str(f), "--output", str(out), "--eval-fraction", "0"]) == 0
    d = cfg.data
    train_dir = resolve_tokenizer_dir(d.tokenizer, cfg.init_from, d.template)  # what the reward-model job resolves
    src = open_source(
        out,
        tokenizer=load_tokenizer(train_dir),
        template=d.template,
        max_length=d.max_length,
        tokenizer_name=str(train_dir),
    )
    assert len(src) == 8 and src.provenance["max_length"] == DEFAULT_MAX_LENGTH


def test_same_size_vocabularies_are_told_apart(tok_dir, tmp_path, tok):
    """Llama-2 and Mistral both have 32,000 tokens with <unk>/<s>/</s> at 0/1/2: sizes cannot tell them apart."""
    other = tmp_path / "other"
    shutil.copytree(tok_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "▁the", "▁and"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    tok2 = load_tokenizer(other)
    assert len(tok2) == len(tok) and tok2.bos_token_id == tok.bos_token_id and tok2.eos_token_id == tok.eos_token_id
    assert tokenizer_fingerprint(tok2) != tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(load_tokenizer(tok_dir)) == tokenizer_fingerprint(tok)


def test_hub_id_offline_is_one_line_naming_it(monkeypatch, tmp_path, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="tokenizer meta-llama/Llama-2-7b-chat-hf: .*Hub"):
        resolve_tokenizer_dir("meta-llama/Llama-2-7b-chat-hf")
    rc = prepare_data.main(
        ["--input", "bundled", "--output", str(tmp_path / "o"), "--tokenizer", "meta-llama/Llama-2-7b-chat-hf"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "meta-llama/Llama-2-7b-chat-hf" in err[0]
    with pytest.raises(CheckpointError, match="folder: no such tokenizer folder"):
        resolve_tokenizer_dir(tmp_path / "no" / "such" / "folder")


def test_openchat_tokenizes_the_same_everywhere(tmp_path):
    """prepare_data, train_rm and score resolve the same tokenizer for openchat_3.5 (<|end_of_turn|> one token)."""
    from starling_jax.train.job import resolve_tokenizer_dir
    from starling_jax.train.rm_config import DataConfig, RMRunConfig

    def train_tokenizer_dir(cfg):  # what the reward-model job resolves
        return resolve_tokenizer_dir(cfg.data.tokenizer, cfg.init_from, cfg.data.template)

    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(good_row(i)) + "\n" for i in range(1, 5)))
    out = tmp_path / "prepared"
    assert (
        prepare_data.main(
            [
                "--input",
                str(f),
                "--output",
                str(out),
                "--template",
                "openchat_3.5",
                "--max-length",
                "64",
                "--eval-fraction",
                "0",
            ]
        )
        == 0
    )
    train_dir = train_tokenizer_dir(RMRunConfig(data=DataConfig(template="openchat_3.5")))
    tok = load_tokenizer(train_dir)
    src = open_source(out, tokenizer=tok, template="openchat_3.5", max_length=64, tokenizer_name=str(train_dir))
    ex = src[0]
    assert all(int(t[-1]) == 32000 for t in ex["tokens"])  # <|end_of_turn|> is one token, the reward token
    assert json.loads((out / "report.json").read_text())["provenance"][
        "tokenizer_fingerprint"
    ] == tokenizer_fingerprint(tok)
    # the default (Mistral) tokenizer splits <|end_of_turn|> into pieces: it is refused, naming both
    with pytest.raises(DataError, match="openchat.*mistral_v1-llama2_chat|mistral_v1-llama2_chat.*openchat"):
        plain = default_tokenizer_for("llama2_chat")
        open_source(
            out, tokenizer=load_tokenizer(plain), template="openchat_3.5", max_length=64, tokenizer_name=str(plain)
        )
