"""Reading HF safetensors folders into sharded starling_jax params (never a pickle).

Import reads the safetensors (single `model.safetensors`, sharded via `model.safetensors.index.json`, or other
`*.safetensors` files) tensor by tensor with `safe_open(framework="numpy")` (bfloat16 arrives as an ml_dtypes
array), converts on the host and places each device's shard with `jax.make_array_from_callback`, so no device
holds more than its shard. Pickle weights (`.bin`, `.pt`, `.pth`, `.ckpt`) are never opened: a folder whose only
weights are pickles is refused (a stray pickle such as `training_args.bin` next to safetensors is ignored).
Import asserts that the key table covers every variable of the model exactly once, that every expected tensor
exists with the expected shape, and that no unexpected tensor is left over.

Reward checkpoints: a stock `*ForSequenceClassification` (`model.` trunk + `score.weight` [1, D]) or the
Starling-RM-7B-alpha layout (trunk under `transformer.`, `model.` or no prefix, plus `v_head.weight` [1, D]);
`v_head` maps to our score head. `init_missing_head=True` starts a reward model from a causal-LM checkpoint
(the score head is randomly initialized, N(0, initializer_range), from `seed`; `lm_head.weight` is ignored).
A causal LM cannot be loaded from a sequence-classification folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open

from starling_jax import hub
from starling_jax.errors import CheckpointError
from starling_jax.model.config import ModelConfig
from starling_jax.model.create import abstract_model
from starling_jax.model.hf_io.keys import (
    HEAD_KEYS,
    IGNORED_SUFFIXES,
    NP_DTYPES,
    TRUNK_PREFIXES,
    KeySpec,
    check_role,
    check_table_covers,
    key_table,
)
from starling_jax.parallel import sharding

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_FILE = "model.safetensors.index.json"  # transformers' index of a sharded folder (write.py writes it too)


class Weights:
    """Tensor name → safetensors file, with lazily opened `safe_open` handles (numpy framework)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (folder / name).is_file():
                    raise CheckpointError(f"{index}: shard file {name} is missing from {folder}")
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
                if pickles:
                    raise CheckpointError(
                        f"{folder / pickles[0]}: refusing to unpickle {', '.join(pickles)} (pickle files can run "
                        f"arbitrary code); convert the weights to safetensors"
                    )
                raise CheckpointError(f"{folder}: no model.safetensors (or sharded *.safetensors + index) found")
            weight_map = None
        self._stack = contextlib.ExitStack()
        self.handles = {}
        self.location: dict[str, str] = {}
        for name in files:
            try:
                handle = self._stack.enter_context(safe_open(str(folder / name), framework="numpy"))
            except Exception as e:
                self._stack.close()
                raise CheckpointError(f"{folder / name}: not a readable safetensors file ({e})") from None
            self.handles[name] = handle
            for key in handle.keys():
                if weight_map is None or weight_map.get(key) == name:
                    self.location.setdefault(key, name)
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in self.location:
                    raise CheckpointError(f"{folder / name}: tensor {key!r} listed in the index is not in the file")
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            log.warning("%s: ignoring pickle files %s (never unpickled); using the safetensors", folder, pickles)

    def keys(self) -> set[str]:
        return set(self.location)

    def file_of(self, key: str) -> Path:
        return self.folder / self.location[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[self.location[key]].get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        return self.handles[self.location[key]].get_tensor(key)

    def close(self):
        self._stack.close()


def describe_folder_weights(folder: Path) -> str:
    index = folder / INDEX_FILE
    if index.is_file():
        return str(index)
    files = sorted(folder.glob("*.safetensors"))
    return str(files[0]) if len(files) == 1 else str(folder / "*.safetensors")


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json in the model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _place(host_fn, shape, dtype, sharding_, layers: list[int] | None):
    """A global jax.Array with `sharding_`: each addressable shard is cut from host arrays on the host.

    host_fn(i) returns the converted host array of layer i (stacked) or of the whole variable (layers is None).
    Stacked variables are assembled one layer at a time into the local shards only.
    """
    index_map = sharding_.addressable_devices_indices_map(shape)
    keyed = {}
    for idx in index_map.values():
        keyed.setdefault(_index_key(idx, shape), idx)
    if layers is None:
        host = host_fn(None)
        buffers = {k: host[idx] for k, idx in keyed.items()}
    else:
        buffers = {k: np.empty(_shard_shape(idx, shape), dtype) for k, idx in keyed.items()}
        for i in layers:
            layer = host_fn(i)
            for k, idx in keyed.items():
                lo, hi, _ = idx[0].indices(shape[0])
                if lo <= i < hi:
                    buffers[k][i - lo] = layer[idx[1:]]
    return jax.make_array_from_callback(shape, sharding_, lambda idx: buffers[_index_key(idx, shape)])


def _index_key(idx, shape):
    return tuple(s.indices(n)[:2] for s, n in zip(idx, shape))


def _shard_shape(idx, shape):
    return tuple(len(range(*s.indices(n))) for s, n in zip(idx, shape))


def load_hf(
    model: str | Path,
    role: str,
    mesh: Mesh,
    *,
    init_missing_head: bool = False,
    seed: int = 0,
    revision: str | None = None,
    **runtime,
) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """Loads a HF Mistral/Llama folder (or Hub id) as `role` straight into shards on `mesh`.

    → (cfg, graphdef, state); `nnx.merge(graphdef, state)` is the model. Raises CheckpointError for a missing or
    inconsistent folder (message names the file and tensor).
    """
    check_role(role)
    folder = hub.resolve(model, revision=revision)
    hf_config = read_hf_config(folder)
    cfg = ModelConfig.from_hf_dict(hf_config, source=str(folder / "config.json"), **runtime)
    weights = Weights(folder)
    try:
        return _load(folder, hf_config, cfg, weights, role, mesh, init_missing_head, seed)
    finally:
        weights.close()


def _load(folder, hf_config, cfg, weights, role, mesh, init_missing_head, seed):
    source = describe_folder_weights(folder)
    keys = weights.keys()
    # Trunk prefix: the one under which the embeddings live.
    prefix = next((p for p in TRUNK_PREFIXES if f"{p}embed_tokens.weight" in keys), None)
    if prefix is None:
        raise CheckpointError(
            f"{source}: missing tensor 'model.embed_tokens.weight' (no Mistral/Llama trunk found "
            f"under the prefixes model., transformer. or none)"
        )
    heads_present = [k for k in HEAD_KEYS if k in keys]
    if len(heads_present) > 1:
        raise CheckpointError(f"{source}: both {heads_present} present; expected one reward head")
    archs = hf_config.get("architectures") or []
    ignored: set[str] = {k for k in keys if k.endswith(IGNORED_SUFFIXES)}
    head_key = None
    if role == "causal_lm":
        if heads_present or any(a.endswith("ForSequenceClassification") for a in archs):
            raise CheckpointError(
                f"{source}: a reward / sequence-classification checkpoint ({heads_present or archs}) has no LM head; "
                f"load it with role 'reward'"
            )
        if cfg.tie_word_embeddings and "lm_head.weight" in keys:
            ignored.add("lm_head.weight")  # a tied head saved anyway: the embeddings are the head
    else:
        if heads_present:
            head_key = heads_present[0]
        elif init_missing_head:
            ignored.add("lm_head.weight")
        else:
            raise CheckpointError(
                f"{source}: missing tensor 'score.weight' (or Starling's 'v_head.weight'): {folder} holds no reward "
                f"head (architectures={archs}); pass init_missing_head=True to start a reward model from a language "
                f"model"
            )

    table = key_table(cfg, role)
    graphdef, abstract = abstract_model(cfg, role)
    check_table_covers(table, abstract, cfg)
    shardings = {
        path: v.get_value() if isinstance(v, nnx.Variable) else v
        for path, v in nnx.to_flat_state(sharding.state_shardings(abstract, mesh))
    }
    flat_abstract = dict(nnx.to_flat_state(abstract))
    dtype = NP_DTYPES[cfg.param_dtype]

    def hf_name(spec: KeySpec) -> str | None:
        if spec.trunk:
            return prefix + spec.hf
        if spec.hf == "score.weight":
            return head_key  # None → random init
        return spec.hf

    # Validate names and shapes of everything before reading any data.
    by_path: dict[tuple, list[KeySpec]] = {}
    used = set()
    for spec in table:
        name = hf_name(spec)
        by_path.setdefault(spec.path, []).append(spec)
        if name is None:
            continue
        if name not in keys:
            raise CheckpointError(f"{source}: missing tensor {name!r} (expected shape {list(spec.hf_shape)})")
        found = weights.shape(name)
        if found != spec.hf_shape:
            raise CheckpointError(
                f"{weights.file_of(name)}: tensor {name!r} has shape {list(found)}, expected {list(spec.hf_shape)} "
                f"from {folder / 'config.json'}"
            )
        used.add(name)
    extra = sorted(keys - used - ignored)
    if extra:
        raise CheckpointError(
            f"{weights.file_of(extra[0])}: unexpected tensor {extra[0]!r}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + f"; not part of a {cfg.model_type} {role} model with {cfg.num_hidden_layers} layers"
        )

    def read(spec: KeySpec) -> np.ndarray:
        name = hf_name(spec)
        if name is None:  # randomly initialized score head
            rng = np.random.default_rng(seed)
            return (cfg.initializer_range * rng.standard_normal(spec.our_shape, np.float32)).astype(dtype)
        w = weights.get(name)
        if not np.issubdtype(w.dtype, np.floating) and w.dtype != NP_DTYPES["bfloat16"]:
            raise CheckpointError(f"{weights.file_of(name)}: tensor {name!r} has dtype {w.dtype}, expected floats")
        return spec.to_ours(w.astype(dtype, copy=False))

    flat_state = []
    for path, var in flat_abstract.items():
        specs = by_path[path]
        shape = tuple(var.get_value().shape)
        if specs[0].layer is None:
            arr = _place(lambda _: read(specs[0]), shape, dtype, shardings[path], None)
        else:
            per_layer = {s.layer: s for s in specs}
            arr = _place(lambda i: read(per_layer[i]), shape, dtype, shardings[path], sorted(per_layer))
        flat_state.append((path, var.replace(value=arr)))
    state = nnx.from_flat_state(flat_state)
    log.info("loaded %s (%s, %d tensors) as %s", folder, cfg.model_type, len(used), role)
    return cfg, graphdef, state


def read_hf_tensors(folder: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a HF safetensors folder as numpy (tests, small models)."""
    w = Weights(Path(folder))
    try:
        return {k: w.get(k) for k in sorted(w.keys())}
    finally:
        w.close()
