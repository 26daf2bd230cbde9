"""Where a model or tokenizer reference points: ONE resolver for every entry point.

    resolve(ref, *, key=None, files="model", revision=None) -> local folder

`ref` is what the user typed for `policy`, `reward_model`, `init_from`, `data.tokenizer`, `--model`, `--base`, ...:

* a local folder: used as it is;
* a URL (`gs://bucket/...`): copied into the local cache (`paths.local_copy`; transformers, tokenizers and
  safetensors read local files only);
* a HuggingFace Hub id (`org/name`, when no such local path exists): fetched with `huggingface_hub.snapshot_download`
  into its usual cache (`$HF_HOME/hub`), only the files named by `MODEL_PATTERNS` (safetensors, configs, tokenizer
  files, chat templates, generation config) or `TOKENIZER_PATTERNS`, never pickles (`PICKLE_PATTERNS`: starling_jax
  neither downloads nor unpickles `.bin`/`.pt`/`.pth` weights). With `HF_HUB_OFFLINE=1` huggingface_hub reads the
  cache only (the snapshot its `refs/main` names).

Every failure is one `CheckpointError` line that names `key=ref` (or the ref) and what to do: a missing folder, an id
that is neither cached (offline) nor on the Hub, a gated repository, a Hub snapshot without config.json or without
safetensors weights (a pickle-only repository such as berkeley-nest/Starling-RM-7B-alpha, which
`python -m starling_jax.convert_starling` turns into a safetensors folder).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from starling_jax.errors import CheckpointError
from starling_jax.paths import as_path, is_url, local_copy

# *.json: config.json, the safetensors index, generation_config.json, tokenizer_config.json, special tokens,
# chat_template.json; tokenizer*: tokenizer.json / tokenizer.model; *.jinja: chat templates.
MODEL_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.jinja"]
TOKENIZER_PATTERNS = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*", "*.jinja"]
# Never fetched, whatever the allow patterns match: pickled weights, and the duplicate raw-format weights some
# Mistral/Llama repositories carry beside the transformers ones (`consolidated.safetensors`, `original/`).
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle"]
IGNORE_PATTERNS = [*PICKLE_PATTERNS, "consolidated*", "original/*"]
CONFIG_PATTERNS = ["*.json", "tokenizer*", "*.jinja"]  # a model's config and tokenizer, without its weights
PATTERNS = {"model": MODEL_PATTERNS, "config": CONFIG_PATTERNS, "tokenizer": TOKENIZER_PATTERNS}
CONVERT_STARLING = "python -m starling_jax.convert_starling"  # with its defaults (convert_starling.py):
STARLING_RM_ALPHA, STARLING_RM_ALPHA_OUTPUT = "berkeley-nest/Starling-RM-7B-alpha", "runs/starling_rm_7b_alpha_hf"
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def looks_like_hub_id(text: str) -> bool:
    """`org/name` with characters the Hub allows (and not a path such as `./x/y` or `/abs`)."""
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or not all(text.split("/")):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _short(text: str, width: int = 200) -> str:
    """One line of at most `width` characters, cut between words."""
    return textwrap.shorten(" ".join(str(text).split()), width, placeholder=" ...")


def hub_cache() -> str:
    return str(constants.HF_HUB_CACHE)


def offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE)


def resolve(ref: str | Path, *, key: str | None = None, files: str = "model", revision: str | None = None) -> Path:
    """The local folder behind `ref` (a folder, a `gs://` URL or a Hub id; see the module doc). `key` is the config
    key or flag the user set (`policy`, `--model`), named in errors; `files` says what a Hub id needs: "model"
    (weights, configs and tokenizer), "config" (config.json and the tokenizer, no weights) or "tokenizer"."""
    if files not in PATTERNS:
        raise ValueError(f"files={files!r}: choose one of {sorted(PATTERNS)}")
    text = str(ref)
    what = "tokenizer" if files == "tokenizer" else "model"
    name = f"{key}={text}" if key else f"{what} {text}"
    if is_url(text):
        if not as_path(text).is_dir():
            raise CheckpointError(f"{name}: no such {what} folder")
        return local_copy(text)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{name}: not a folder (give the {what} folder, not a file)")
        return path
    if not looks_like_hub_id(text):
        raise CheckpointError(
            f"{name}: no such {what} folder (give a local folder, a gs:// URL or a HuggingFace Hub id like org/name)"
        )
    folder = _snapshot(text, name, files, revision)
    if files != "tokenizer":
        if not (folder / "config.json").is_file():
            raise CheckpointError(
                f"{name}: the Hub snapshot {folder} has no config.json (not a transformers model, or "
                f"an incomplete download: fetch it again with network access)"
            )
        if files == "model" and not any(folder.glob("*.safetensors")):
            raise CheckpointError(
                f"{name}: the Hub snapshot {folder} has no safetensors weights (starling_jax never downloads or "
                f"unpickles .bin/.pt weights); convert them to a safetensors folder and pass that (the pickled "
                f"{STARLING_RM_ALPHA}: `{CONVERT_STARLING}` writes {STARLING_RM_ALPHA_OUTPUT})"
            )
    elif not any((folder / f).is_file() for f in TOKENIZER_MARKERS):
        raise CheckpointError(
            f"{name}: the Hub snapshot {folder} has no tokenizer files ({', '.join(TOKENIZER_MARKERS)})"
        )
    return folder


def _snapshot(repo_id: str, name: str, files: str, revision: str | None) -> Path:
    """`snapshot_download` of the allowed files → the snapshot folder, or one line saying why not."""
    include = " ".join(f"--include '{p}'" for p in PATTERNS[files])
    download = f"`hf download {repo_id} {include}`"
    local = "pass a local folder; offline: HF_HUB_OFFLINE=1 reads only the cache"
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=PATTERNS[files], ignore_patterns=IGNORE_PATTERNS
            )
        )
    except GatedRepoError:
        why = (
            f"a gated repository on the HuggingFace Hub: accept its terms on https://huggingface.co/{repo_id} "
            f"and log in (`hf auth login`), or pass a local folder"
        )
    except RepositoryNotFoundError:
        why = (
            "no such repository on the HuggingFace Hub (or a private one: log in with `hf auth login`); check "
            "the id or pass a local folder"
        )
    except RevisionNotFoundError:
        why = f"the HuggingFace Hub has no revision {revision!r} of it"
    except (LocalEntryNotFoundError, IncompleteSnapshotError) as e:
        if offline():
            why = (
                f"not in the HuggingFace Hub cache {hub_cache()} (HF_HUB_OFFLINE=1 reads only the cache); "
                f"download it with network access ({download}) or pass a local folder"
            )
        else:
            cause = e.__cause__ or e
            why = (
                f"not fetched from the HuggingFace Hub ({type(cause).__name__}: {_short(cause)}); download it "
                f"with {download} or {local}"
            )
    except Exception as e:  # noqa: BLE001 - proxy errors, Hub downtime, a bad token, ...
        why = (
            f"not fetched from the HuggingFace Hub ({type(e).__name__}: {_short(e)}); download it with "
            f"{download} or {local}"
        )
    raise CheckpointError(f"{name}: not a local folder, and {why}")
