"""HuggingFace ↔ starling_jax weights: ONE declarative key table drives both import and export.

API
---
  load_hf(model, role, mesh, *, init_missing_head=False, seed=0, revision=None, **runtime)
      -> (cfg, graphdef, state)
  save_hf(folder, cfg, state, role, *, tokenizer_dir=None, extra_config=None, max_shard_bytes=5e9) -> Path
  key_table(cfg, role) -> list[KeySpec]     (the table; used by both directions and by tests)

`model` is a local folder, a URL (`gs://...`) or a Hub id, resolved by `hub.py::resolve` (URLs copied into the
local cache, Hub ids fetched without pickles into the HF cache; `HF_HUB_OFFLINE=1` reads the cache). `save_hf`'s
folder may be a URL too (written locally, then uploaded). `role` is "causal_lm" or "reward".
`runtime` are `ModelConfig` runtime overrides (dtype, param_dtype, scan_layers, remat_policy).

The table
---------
Every entry names one HF tensor, the path of the starling_jax variable, both shapes and the conversion:
  copy    same layout (embeddings, RMSNorm scales)
  linear  a torch `Linear.weight` [out, in] ↔ our kernel [*in_dims, *out_dims] (`in_ndim` leading dims are the
          input): HF → ours is `w.T.reshape(our_shape)`, ours → HF is `w.reshape(prod(in), prod(out)).T`.
          q_proj [H·Dh, D] ↔ [D, H, Dh]; k/v_proj [G·Dh, D] ↔ [D, G, Dh]; o_proj [D, H·Dh] ↔ [H, Dh, D];
          gate/up_proj [F, D] ↔ [D, F]; down_proj [D, F] ↔ [F, D]; lm_head [V, D] ↔ [D, V]; score [1, D] ↔ [D, 1].
Layer entries carry their layer index; with `cfg.scan_layers=False` the variable is `decoder.layers.<i>.…`, with
`scan_layers=True` it is `decoder.layers.…` with a leading [num_layers] axis and entry i is its slice i.
Import asserts that the table covers every variable of the model exactly once, that every expected tensor
exists with the expected shape, and that no unexpected tensor is left over.

Reward checkpoints: a stock `*ForSequenceClassification` (`model.` trunk + `score.weight` [1, D]) or the
Starling-RM-7B-alpha layout (trunk under `transformer.`, `model.` or no prefix, plus `v_head.weight` [1, D]);
`v_head` maps to our score head. `init_missing_head=True` starts a reward model from a causal-LM checkpoint
(the score head is randomly initialized, N(0, initializer_range), from `seed`; `lm_head.weight` is ignored).
A causal LM cannot be loaded from a sequence-classification folder.

Import reads the safetensors (single `model.safetensors`, sharded via `model.safetensors.index.json`, or other
`*.safetensors` files) tensor by tensor with `safe_open(framework="numpy")` (bfloat16 arrives as an ml_dtypes
array), converts on the host and places each device's shard with `jax.make_array_from_callback`, so no device
holds more than its shard. Pickle weights (`.bin`, `.pt`, `.pth`, `.ckpt`) are never opened: a folder whose only
weights are pickles is refused (a stray pickle such as `training_args.bin` next to safetensors is ignored).

Export gathers one tensor at a time to the host (`process_allgather` on several hosts; process 0 writes), in
`cfg.param_dtype`, into `model.safetensors` or `model-0000k-of-0000n.safetensors` + index, writes `config.json`
(`MistralForCausalLM` / `LlamaForSequenceClassification` …; reward: num_labels 1, id2label, pad_token_id,
plus `extra_config`), and copies the tokenizer files from `tokenizer_dir`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Iterable

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from starling_jax import hub
from starling_jax.data import tokenizer as tokenizer_lib
from starling_jax.errors import CheckpointError, ConfigError
from starling_jax.model import heads
from starling_jax.model.config import ARCHITECTURES, ModelConfig
from starling_jax.model.create import abstract_model
from starling_jax.parallel import sharding
from starling_jax.paths import as_path, is_url, upload_folder

log = logging.getLogger(__name__)

ROLES = tuple(heads.ROLES)  # the one role registry (model/heads.py)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
)
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
TRUNK_PREFIXES = ("model.", "transformer.", "")
HEAD_KEYS = ("score.weight", "v_head.weight")
# Non-parameter buffers some older checkpoints carry; skipped on import.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------- the key table
@dataclasses.dataclass(frozen=True)
class KeySpec:
    hf: str  # HF name without the trunk prefix for trunk tensors ("embed_tokens.weight"), full name for heads
    path: tuple  # starling_jax state path of the variable
    kind: str  # "copy" | "linear"
    hf_shape: tuple[int, ...]
    our_shape: tuple[int, ...]  # shape of this entry (one layer's slice for stacked layers)
    in_ndim: int = 1  # linear: how many leading dims of our shape are the input
    layer: int | None = None  # stacked layers: the index along the leading axis
    trunk: bool = True  # HF name lives under the trunk prefix (model. / transformer.)

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        return w if self.kind == "copy" else np.ascontiguousarray(w.T).reshape(self.our_shape)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "copy":
            return np.ascontiguousarray(w)
        n_in = math.prod(self.our_shape[: self.in_ndim])
        return np.ascontiguousarray(w.reshape(n_in, -1).T)


def key_table(cfg: ModelConfig, role: str) -> list[KeySpec]:
    """The one HF ↔ starling_jax table for `cfg` and `role` (head last, as `score.weight` for reward)."""
    if role not in ROLES:
        raise ConfigError(f"model role {role!r}: choose one of {list(ROLES)}")
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, g, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
    table = [KeySpec("embed_tokens.weight", ("decoder", "embed"), "copy", (v, d), (v, d))]
    for i in range(cfg.num_hidden_layers):
        pre = ("decoder", "layers") if cfg.scan_layers else ("decoder", "layers", i)
        layer = i if cfg.scan_layers else None
        hf = f"layers.{i}."

        def lin(name, path, hf_shape, our_shape, in_ndim=1):
            return KeySpec(hf + name, pre + path, "linear", hf_shape, our_shape, in_ndim, layer)

        table += [
            lin("self_attn.q_proj.weight", ("attn", "q_proj"), (h * dh, d), (d, h, dh)),
            lin("self_attn.k_proj.weight", ("attn", "k_proj"), (g * dh, d), (d, g, dh)),
            lin("self_attn.v_proj.weight", ("attn", "v_proj"), (g * dh, d), (d, g, dh)),
            lin("self_attn.o_proj.weight", ("attn", "o_proj"), (d, h * dh), (h, dh, d), in_ndim=2),
            lin("mlp.gate_proj.weight", ("mlp", "gate_proj"), (f, d), (d, f)),
            lin("mlp.up_proj.weight", ("mlp", "up_proj"), (f, d), (d, f)),
            lin("mlp.down_proj.weight", ("mlp", "down_proj"), (d, f), (f, d)),
            KeySpec(hf + "input_layernorm.weight", pre + ("attn_norm", "scale"), "copy", (d,), (d,), layer=layer),
            KeySpec(
                hf + "post_attention_layernorm.weight", pre + ("mlp_norm", "scale"), "copy", (d,), (d,), layer=layer
            ),
        ]
    table.append(KeySpec("norm.weight", ("decoder", "final_norm", "scale"), "copy", (d,), (d,)))
    if role == "causal_lm" and not cfg.tie_word_embeddings:
        table.append(KeySpec("lm_head.weight", ("lm_head", "kernel"), "linear", (v, d), (d, v), trunk=False))
    if role == "reward":
        table.append(KeySpec("score.weight", ("score", "kernel"), "linear", (1, d), (d, 1), trunk=False))
    return table


def _check_table_covers(table: list[KeySpec], abstract: nnx.State, cfg: ModelConfig) -> None:
    """Every variable of the model is filled exactly once (per layer slice when stacked), with matching shapes."""
    flat = dict(nnx.to_flat_state(abstract))
    counts: dict[tuple, int] = {}
    for spec in table:
        if spec.path not in flat:
            raise AssertionError(f"key table names {spec.path}, which the model does not have")
        shape = tuple(flat[spec.path].get_value().shape)
        expected = ((cfg.num_hidden_layers,) + spec.our_shape) if spec.layer is not None else spec.our_shape
        assert shape == expected, f"{spec.path}: model shape {shape} != table shape {expected}"
        counts[spec.path] = counts.get(spec.path, 0) + 1
    for path in flat:
        want = cfg.num_hidden_layers if (cfg.scan_layers and path[:2] == ("decoder", "layers")) else 1
        if counts.get(path, 0) != want:
            raise AssertionError(f"variable {path} is covered {counts.get(path, 0)} times by the key table")


class _Weights:
    """Tensor name → safetensors file, with lazily opened `safe_open` handles (numpy framework)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        index = folder / "model.safetensors.index.json"
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


def _describe_folder_weights(folder: Path) -> str:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return str(index)
    files = sorted(folder.glob("*.safetensors"))
    return str(files[0]) if len(files) == 1 else str(folder / "*.safetensors")


def _read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json in the model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------- import
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
    if role not in ROLES:
        raise ConfigError(f"model role {role!r}: choose one of {list(ROLES)}")
    folder = hub.resolve(model, revision=revision)
    hf_config = _read_hf_config(folder)
    cfg = ModelConfig.from_hf_dict(hf_config, source=str(folder / "config.json"), **runtime)
    weights = _Weights(folder)
    try:
        return _load(folder, hf_config, cfg, weights, role, mesh, init_missing_head, seed)
    finally:
        weights.close()


def _load(folder, hf_config, cfg, weights, role, mesh, init_missing_head, seed):
    source = _describe_folder_weights(folder)
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
    _check_table_covers(table, abstract, cfg)
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


# ---------------------------------------------------------------------------------------------- export
def _gather(arr) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(arr, tiled=True))
    return np.asarray(jax.device_get(arr))


def _pad_token_id(cfg: ModelConfig, tokenizer_dir: str | Path | None) -> int | None:
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    if tokenizer_dir is None:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer_dir)).pad_token_id
    except Exception as e:
        raise CheckpointError(f"{tokenizer_dir}: cannot read the tokenizer to find its pad token ({e})") from None


def hf_config_dict(
    cfg: ModelConfig, role: str, pad_token_id: int | None = None, extra_config: dict | None = None
) -> dict[str, Any]:
    import transformers

    hf = cfg.to_hf_dict()
    prefix = ARCHITECTURES[cfg.model_type]
    if role not in ROLES:
        raise ConfigError(f"model role {role!r}: choose one of {list(ROLES)}")
    hf["architectures"] = [f"{prefix}{heads.ROLES[role].hf_suffix}"]
    if role == "reward":
        hf["num_labels"] = 1
        hf["id2label"] = {"0": "LABEL_0"}
        hf["label2id"] = {"LABEL_0": 0}
        hf["problem_type"] = "regression"
    if pad_token_id is not None:
        hf["pad_token_id"] = int(pad_token_id)
    hf["dtype"] = cfg.param_dtype
    hf["transformers_version"] = transformers.__version__
    hf.update(extra_config or {})
    return hf


def check_output_folder(folder: str | Path, overwrite: bool) -> None:
    """An existing non-empty output folder is refused unless `overwrite` (CheckpointError)."""
    folder = as_path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise CheckpointError(f"{folder}: output folder exists and is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_folder(folder: str | Path, *, write: bool = True):
    """Yields a temporary sibling folder to write into; on success it replaces `folder` in one rename (the old
    folder, if any, is moved aside first and deleted after), on failure it is deleted. A reader never sees a
    half-written folder. `write=False` (non-writing hosts) yields `folder` and does nothing.

    A URL folder is written to a local temporary folder and uploaded when complete (`paths.upload_folder`:
    Cloud Storage has no folder rename, so a reader may see it part-way; config.json comes last)."""
    import os
    import tempfile

    folder = as_path(folder, absolute=True)
    if not write:
        yield folder
        return
    if is_url(folder):
        with tempfile.TemporaryDirectory(prefix=f"{folder.name}.") as tmp:
            yield Path(tmp)
            upload_folder(Path(tmp), folder)
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / "x")
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_hf(
    folder: str | Path,
    cfg: ModelConfig,
    state: nnx.State,
    role: str,
    *,
    tokenizer_dir: str | Path | None = None,
    template: str | None = None,
    extra_config: dict | None = None,
    max_shard_bytes: int = 5_000_000_000,
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
    from safetensors.numpy import save_file

    folder = as_path(folder)
    writer = jax.process_index() == 0
    if writer:
        check_output_folder(folder, overwrite)
    export_tok = None
    if template is not None and tokenizer_dir is not None:
        export_tok = tokenizer_lib.prepare_export_tokenizer(tokenizer_dir, template, str(folder))
        pad = export_tok.pad_token_id if role == "reward" else _pad_token_id(cfg, tokenizer_dir)
    else:
        pad = _pad_token_id(cfg, tokenizer_dir)
    if role == "reward" and pad is None:
        raise CheckpointError(
            f"{folder}: a reward model needs pad_token_id in config.json (HF sequence classification finds the last "
            f"token with it); set model.pad_token_id or pass a tokenizer_dir whose tokenizer has a pad token"
        )
    config = hf_config_dict(cfg, role, pad, extra_config)
    table = key_table(cfg, role)
    flat = dict(nnx.to_flat_state(state))
    missing = [spec.path for spec in table if spec.path not in flat]
    if missing:
        raise CheckpointError(f"{folder}: the state has no variable {missing[0]} needed for a {role} model")
    dtype = NP_DTYPES[cfg.param_dtype]

    def hf_name(spec):
        return f"model.{spec.hf}" if spec.trunk else spec.hf

    # Plan the shards from shapes alone, then gather and write one shard at a time.
    shards, current, size = [], [], 0
    for spec in table:
        nbytes = math.prod(spec.hf_shape) * dtype.itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    shards.append(current)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )

    with atomic_folder(folder, write=writer) as out:  # written aside, renamed into place when complete
        weight_map, total = {}, 0
        for name, specs in zip(names, shards):
            tensors = {}
            for spec in specs:
                arr = flat[spec.path].get_value()
                if spec.layer is not None:
                    arr = arr[spec.layer]
                host = _gather(arr)
                if tuple(host.shape) != spec.our_shape:
                    raise CheckpointError(
                        f"{folder}: variable {spec.path} has shape {list(host.shape)}, expected "
                        f"{list(spec.our_shape)} for this config"
                    )
                tensors[hf_name(spec)] = spec.to_hf(host.astype(dtype, copy=False))
                weight_map[hf_name(spec)] = name
                total += tensors[hf_name(spec)].nbytes
            if writer:
                save_file(tensors, str(out / name), metadata={"format": "pt"})
            del tensors
        if writer:
            if len(shards) > 1:
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            if tokenizer_dir is not None:
                copy_tokenizer_files(tokenizer_dir, out)
                if export_tok is not None:
                    tokenizer_lib.save_export_tokenizer(export_tok, tokenizer_dir, out)
            for extra in map(Path, extra_files):
                shutil.copyfile(extra, out / extra.name)

    return folder


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
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


def read_hf_tensors(folder: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a HF safetensors folder as numpy (tests, small models)."""
    w = _Weights(Path(folder))
    try:
        return {k: w.get(k) for k in sorted(w.keys())}
    finally:
        w.close()


__all__: Iterable[str] = (
    "KeySpec",
    "key_table",
    "load_hf",
    "save_hf",
    "read_hf_tensors",
    "hf_config_dict",
    "copy_tokenizer_files",
)
