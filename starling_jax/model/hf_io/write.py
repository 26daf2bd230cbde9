"""Writing HF folders: `save_hf` (a starling_jax state → safetensors + config.json + tokenizer) and the one
safetensors shard planner (`plan_shards`, huggingface_hub's) that `convert_starling` shares.

Export gathers one tensor at a time to the host (`process_allgather` on several hosts; process 0 writes), in
`cfg.param_dtype`, into `model.safetensors` or `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`
(the transformers layout: `{"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}`), writes
`config.json` (`MistralForCausalLM` / `LlamaForSequenceClassification` …; reward: num_labels 1, id2label,
pad_token_id, plus `extra_config`), and the tokenizer from `tokenizer_dir` (`hf_io/tokenizer.py`). The folder is
written aside and renamed into place (`paths.atomic_folder`).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
import safetensors.numpy
from flax import nnx
from huggingface_hub import StateDictSplit, split_state_dict_into_shards_factory
from jax.experimental import multihost_utils

from starling_jax.errors import CheckpointError
from starling_jax.model import heads
from starling_jax.model.config import ARCHITECTURES, ModelConfig
from starling_jax.model.hf_io.keys import NP_DTYPES, check_role, key_table
from starling_jax.model.hf_io.read import INDEX_FILE
from starling_jax.model.hf_io.tokenizer import prepare_tokenizer_export, write_tokenizer
from starling_jax.paths import as_path, atomic_folder, check_output_folder

FILENAME_PATTERN = "model{suffix}.safetensors"  # → model.safetensors or model-00001-of-00002.safetensors
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000  # bytes; transformers' default "5GB"


def plan_shards(sizes: Mapping[str, int], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> StateDictSplit:
    """Tensor name → bytes (in write order) into safetensors files of at most `max_shard_size` bytes (an int or
    "5GB"), by huggingface_hub's planner: the file names and index transformers writes and reads."""
    return split_state_dict_into_shards_factory(
        dict(sizes), get_storage_size=int, filename_pattern=FILENAME_PATTERN, max_shard_size=max_shard_size
    )


def write_safetensors(
    out: Path,
    split: StateDictSplit,
    tensors_of: Callable[[list[str]], dict],
    save_file: Callable,
    *,
    write: bool = True,
) -> None:
    """Writes the files of `split` into `out` one at a time: `tensors_of(names)` gives one file's tensors (called on
    every process: it may gather), `save_file` is safetensors' numpy or torch writer; the index when sharded."""
    for filename, names in split.filename_to_tensors.items():
        tensors = tensors_of(names)
        if write:
            save_file(tensors, str(out / filename), metadata={"format": "pt"})
        del tensors
    if write and split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _gather(arr) -> np.ndarray:
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(arr, tiled=True))
    return np.asarray(jax.device_get(arr))


def _transformers_version() -> str | None:
    try:  # the installed version, without importing transformers (export does not need it)
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def hf_config_dict(
    cfg: ModelConfig, role: str, pad_token_id: int | None = None, extra_config: dict | None = None
) -> dict[str, Any]:
    """The `config.json` of a `role` export of `cfg`."""
    check_role(role)
    hf = cfg.to_hf_dict()
    hf["architectures"] = [f"{ARCHITECTURES[cfg.model_type]}{heads.ROLES[role].hf_suffix}"]
    if role == "reward":
        hf["num_labels"] = 1
        hf["id2label"] = {"0": "LABEL_0"}
        hf["label2id"] = {"LABEL_0": 0}
        hf["problem_type"] = "regression"
    if pad_token_id is not None:
        hf["pad_token_id"] = int(pad_token_id)
    hf["dtype"] = cfg.param_dtype
    version = _transformers_version()
    if version is not None:
        hf["transformers_version"] = version
    hf.update(extra_config or {})
    return hf


def save_hf(
    folder: str | Path,
    cfg: ModelConfig,
    state: nnx.State,
    role: str,
    *,
    tokenizer_dir: str | Path | None = None,
    template: str | None = None,
    extra_config: dict | None = None,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = True,
    extra_files: Iterable[str | Path] = (),
) -> Path:
    """Writes `state` (a `role` model of `cfg`) as a HF folder that transformers loads; returns the folder.

    With `template` (the data template the model was trained with) the exported tokenizer's `chat_template`
    renders exactly the training tokens and a reward model's pad id is made safe for HF pooling
    (`tokenizer.export_tokenizer`). The folder is written to a temporary sibling and renamed into place; an
    existing non-empty folder is refused unless `overwrite`. `extra_files` (local files, e.g. the policy's
    `generation_config.json`) are copied into the folder before it is renamed or uploaded.
    Every process must call it (the gathers are collective); only process 0 writes.
    """
    folder = as_path(folder)
    writer = jax.process_index() == 0
    if writer:
        check_output_folder(folder, overwrite)
    export_tok, pad = prepare_tokenizer_export(cfg, role, tokenizer_dir, template, str(folder))
    if role == "reward" and pad is None:
        raise CheckpointError(
            f"{folder}: a reward model needs pad_token_id in config.json (HF sequence classification finds the last "
            f"token with it); set model.pad_token_id or pass a tokenizer_dir whose tokenizer has a pad token"
        )
    config = hf_config_dict(cfg, role, pad, extra_config)
    flat = dict(nnx.to_flat_state(state))
    specs = {spec.hf_name: spec for spec in key_table(cfg, role)}
    missing = [spec.path for spec in specs.values() if spec.path not in flat]
    if missing:
        raise CheckpointError(f"{folder}: the state has no variable {missing[0]} needed for a {role} model")
    dtype = NP_DTYPES[cfg.param_dtype]
    # Plan the shards from shapes alone, then gather and write one shard at a time.
    split = plan_shards({name: math.prod(s.hf_shape) * dtype.itemsize for name, s in specs.items()}, max_shard_bytes)

    def tensors_of(names: list[str]) -> dict[str, np.ndarray]:
        tensors = {}
        for name in names:
            spec = specs[name]
            arr = flat[spec.path].get_value()
            if spec.layer is not None:
                arr = arr[spec.layer]
            host = _gather(arr)
            if tuple(host.shape) != spec.our_shape:
                raise CheckpointError(
                    f"{folder}: variable {spec.path} has shape {list(host.shape)}, expected "
                    f"{list(spec.our_shape)} for this config"
                )
            tensors[name] = spec.to_hf(host.astype(dtype, copy=False))
        return tensors

    with atomic_folder(folder, write=writer) as out:  # written aside, renamed into place when complete
        write_safetensors(out, split, tensors_of, safetensors.numpy.save_file, write=writer)
        if writer:
            (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            if tokenizer_dir is not None:
                write_tokenizer(out, tokenizer_dir, export_tok)
            for extra in map(Path, extra_files):
                shutil.copyfile(extra, out / extra.name)
    return folder
