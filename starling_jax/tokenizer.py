"""Offline HF tokenizer folders built from `mistral-common`'s `tokenizer.model.v1`.

`mistral-common` ships the 32,000-token Mistral-7B-v0.1 SentencePiece model. `build_tokenizer` copies it into a
folder with a `tokenizer_config.json` naming `LlamaTokenizer` (BOS `<s>`, EOS `</s>`, UNK `<unk>`), lets
transformers convert it once (needs `sentencepiece`), checks that the vocabulary really has 32,000 tokens
(transformers 5 silently builds an empty 3-token tokenizer from `LlamaTokenizer(vocab_file=...)`), and saves the
fast tokenizer (`tokenizer.json`), so later loads are fast and need no `sentencepiece`.

Pad token: `<unk>` (id 0), as Starling-RM-7B-alpha used, or `<|pad_0|>` (id 32001) with the OpenChat special
tokens (`<|end_of_turn|>` id 32000 becomes the EOS). The named chat template is stored as the tokenizer's
`chat_template`; the templates live in `starling_jax.data.chat`.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path

from starling_jax.data.chat import get_template
from starling_jax.errors import CheckpointError

BASE_VOCAB = 32000
OPENCHAT_TOKENS = ("<|end_of_turn|>", "<|pad_0|>")


def sentencepiece_model_path() -> Path:
    """Path of `mistral_common/data/tokenizer.model.v1`."""
    p = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    path = Path(str(p))
    if not path.is_file():
        raise CheckpointError(f"{path}: mistral-common's tokenizer.model.v1 not found (pip install mistral-common)")
    return path


def _name(chat_template: str, openchat_special_tokens: bool) -> str:
    return f"mistral_v1-{chat_template}" + ("-openchat" if openchat_special_tokens else "")


def build_tokenizer(output_dir, chat_template: str = "llama2_chat", openchat_special_tokens: bool = False) -> Path:
    """Build an HF tokenizer folder at `output_dir` and return its path."""
    from transformers import AutoTokenizer

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(sentencepiece_model_path(), Path(tmp) / "tokenizer.model")
        cfg = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": 32768,
            "clean_up_tokenization_spaces": False,
        }
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
        tok = AutoTokenizer.from_pretrained(tmp)
        if len(tok) != BASE_VOCAB:
            raise CheckpointError(f"{tmp}: converted tokenizer has {len(tok)} tokens, expected {BASE_VOCAB}")
    if openchat_special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(OPENCHAT_TOKENS)})
        ids = tok.convert_tokens_to_ids(list(OPENCHAT_TOKENS))
        if ids != [BASE_VOCAB, BASE_VOCAB + 1]:
            raise CheckpointError(f"OpenChat tokens got ids {ids}, expected [32000, 32001]")
        tok.eos_token = OPENCHAT_TOKENS[0]
        tok.pad_token = OPENCHAT_TOKENS[1]
    else:
        tok.pad_token = "<unk>"
    template = get_template(chat_template) if chat_template != "tokenizer" else None
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(str(out))
    # the sentencepiece model is kept for tools that want the slow tokenizer
    shutil.copy(sentencepiece_model_path(), out / "tokenizer.model")
    check = load_tokenizer(out)
    expected = BASE_VOCAB + (2 if openchat_special_tokens else 0)
    if len(check) != expected:
        raise CheckpointError(f"{out}: saved tokenizer has {len(check)} tokens, expected {expected}")
    return out


def cache_root() -> Path:
    env = os.environ.get("STARLING_JAX_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "starling_jax"
    return base / "tokenizers"


def default_tokenizer_dir(chat_template: str = "llama2_chat", openchat_special_tokens: bool = False) -> Path:
    """Build the tokenizer once into the cache folder and reuse it afterwards."""
    d = cache_root() / _name(chat_template, openchat_special_tokens)
    if (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file():
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=d.name + ".", dir=d.parent))
    try:
        build_tokenizer(tmp, chat_template, openchat_special_tokens)
        try:
            os.replace(tmp, d)  # atomic when several processes build at once
        except OSError:
            if not (d / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def load_tokenizer(path):
    """Load an HF tokenizer folder (CheckpointError if missing or without a tokenizer)."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: tokenizer folder not found")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise CheckpointError(f"{p}: no tokenizer.json / tokenizer.model / tokenizer_config.json in folder")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001 - any load failure is a bad folder
        raise CheckpointError(f"{p}: cannot load tokenizer: {type(e).__name__}: {e}") from e
    if len(tok) < BASE_VOCAB // 2:
        raise CheckpointError(f"{p}: tokenizer has only {len(tok)} tokens (broken conversion?)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok
