"""The tokenizer half of a HF export: the tokenizer files copied from the training tokenizer, and with the data
template the model was trained with, a tokenizer whose `chat_template` renders exactly the training tokens and
whose pad id is safe for HF pooling (`data.tokenizer.prepare_export_tokenizer`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from starling_jax.data import tokenizer as tokenizer_lib
from starling_jax.errors import CheckpointError
from starling_jax.model.config import ModelConfig

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copies the tokenizer files of folder `src` into `dst`; returns their names (CheckpointError if none)."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: tokenizer folder not found")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if not copied:
        raise CheckpointError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}) to copy")
    return copied


def tokenizer_pad_token_id(cfg: ModelConfig, tokenizer_dir: str | Path | None) -> int | None:
    """The config's pad id, else the tokenizer's own (None without either)."""
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    if tokenizer_dir is None:
        return None
    try:
        # transformers only here: the tokenizer's own pad token, read when an export has no pad id in its config
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer_dir)).pad_token_id
    except Exception as e:  # noqa: BLE001 - any failure to read it is a bad tokenizer folder
        raise CheckpointError(f"{tokenizer_dir}: cannot read the tokenizer to find its pad token ({e})") from None


def prepare_tokenizer_export(cfg: ModelConfig, role: str, tokenizer_dir, template: str | None, where: str):
    """→ (export tokenizer or None, pad id for config.json). With `template` the export tokenizer carries the
    training format as `chat_template`; a reward model's pad id is then its safe pad."""
    if template is not None and tokenizer_dir is not None:
        export_tok = tokenizer_lib.prepare_export_tokenizer(tokenizer_dir, template, where)
        pad = export_tok.pad_token_id if role == "reward" else tokenizer_pad_token_id(cfg, tokenizer_dir)
        return export_tok, pad
    return None, tokenizer_pad_token_id(cfg, tokenizer_dir)


def write_tokenizer(out: Path, tokenizer_dir, export_tok=None) -> None:
    """Copies the tokenizer files into `out`, then saves the export tokenizer (chat template, pad) over them."""
    copy_tokenizer_files(tokenizer_dir, out)
    if export_tok is not None:
        tokenizer_lib.save_export_tokenizer(export_tok, tokenizer_dir, out)
