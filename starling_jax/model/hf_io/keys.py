"""The one HF ↔ starling_jax key table: every entry names one HF tensor, the path of the starling_jax variable,
both shapes and the conversion. Import (`read.py`) and export (`write.py`) both walk it.

  copy    same layout (embeddings, RMSNorm scales)
  linear  a torch `Linear.weight` [out, in] ↔ our kernel [*in_dims, *out_dims] (`in_ndim` leading dims are the
          input): HF → ours is `w.T.reshape(our_shape)`, ours → HF is `w.reshape(prod(in), prod(out)).T`.
          q_proj [H·Dh, D] ↔ [D, H, Dh]; k/v_proj [G·Dh, D] ↔ [D, G, Dh]; o_proj [D, H·Dh] ↔ [H, Dh, D];
          gate/up_proj [F, D] ↔ [D, F]; down_proj [D, F] ↔ [F, D]; lm_head [V, D] ↔ [D, V]; score [1, D] ↔ [D, 1].
Layer entries carry their layer index; with `cfg.scan_layers=False` the variable is `decoder.layers.<i>.…`, with
`scan_layers=True` it is `decoder.layers.…` with a leading [num_layers] axis and entry i is its slice i.
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
from flax import nnx

from starling_jax.errors import ConfigError
from starling_jax.model import heads
from starling_jax.model.config import ModelConfig

ROLES = tuple(heads.ROLES)  # the one role registry (model/heads.py)
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
TRUNK_PREFIXES = ("model.", "transformer.", "")
HEAD_KEYS = ("score.weight", "v_head.weight")
# Non-parameter buffers some older checkpoints carry; skipped on import.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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

    @property
    def hf_name(self) -> str:
        """The name transformers writes (trunk under `model.`)."""
        return f"model.{self.hf}" if self.trunk else self.hf

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        return w if self.kind == "copy" else np.ascontiguousarray(w.T).reshape(self.our_shape)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "copy":
            return np.ascontiguousarray(w)
        n_in = math.prod(self.our_shape[: self.in_ndim])
        return np.ascontiguousarray(w.reshape(n_in, -1).T)


def check_role(role: str) -> None:
    if role not in ROLES:
        raise ConfigError(f"model role {role!r}: choose one of {list(ROLES)}")


def key_table(cfg: ModelConfig, role: str) -> list[KeySpec]:
    """The one HF ↔ starling_jax table for `cfg` and `role` (head last, as `score.weight` for reward)."""
    check_role(role)
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


def check_table_covers(table: list[KeySpec], abstract: nnx.State, cfg: ModelConfig) -> None:
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
