"""Decoder configuration: the architecture (read from / written to a HuggingFace `config.json`) plus runtime
choices (dtypes, remat, scan) that HF does not know about.

One dataclass covers the Mistral-7B-v0.1 and Llama-2 families: they differ only in GQA, FFN width and the
sliding window, all of which are fields here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from starling_jax.errors import CheckpointError, ConfigError
from starling_jax.model import attention

# HF `model_type` → the `*For*` class prefix used on export.
ARCHITECTURES = {"mistral": "Mistral", "llama": "Llama"}
REMAT_POLICIES = ("none", "full", "full_offload", "dots", "dots_no_batch")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # --- architecture (HF config.json) ---
    model_type: str = "mistral"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None → hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    sliding_window: int | None = None  # None → full causal attention
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # --- runtime (not in HF) ---
    param_dtype: str = "float32"  # master weights
    dtype: str = "float32"  # compute dtype (bfloat16 on TPU)
    remat_policy: str = "none"  # none | full | full_offload (layer inputs in host memory) | dots | dots_no_batch
    scan_layers: bool = False
    attention_impl: str = "einsum"  # an entry of model/attention/registry.py (einsum, blockwise, ...) or auto
    attention_block: int = 0  # blockwise: query and key block length; 0 = by platform and row length (resolve_blocks)
    # The MLP over the sequence in this many chunks (the gcd with each call's length L), each under remat with
    # `remat_policy`: one layer's [N, L, F] MLP activations in the backward shrink to [N, L/chunks, F].
    mlp_chunks: int = 1

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ConfigError(
                f"model.model_type={self.model_type!r}: unknown architecture; supported: {sorted(ARCHITECTURES)}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"model.remat_policy={self.remat_policy!r}: choose one of {list(REMAT_POLICIES)}")
        attention.check_impl(self.attention_impl)  # the registry's names (model/attention/registry.py)
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"model.{key}={getattr(self, key)!r}: choose one of {sorted(DTYPES)}")
        if self.attention_block < 0:
            raise ConfigError(f"model.attention_block={self.attention_block}: must be >= 0 (0 = by platform)")
        if self.mlp_chunks < 1:
            raise ConfigError(f"model.mlp_chunks={self.mlp_chunks}: must be >= 1 (1 = the whole sequence at once)")
        if self.hidden_size % self.num_attention_heads and self.head_dim is None:
            raise ConfigError("model.hidden_size must be divisible by num_attention_heads (or set head_dim)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF interchange
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json", **runtime) -> "ModelConfig":
        """Builds a config from a HF `config.json` dict; refuses features this decoder does not implement."""
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            archs = hf.get("architectures")
            raise CheckpointError(
                f"{source}: unknown architecture model_type={model_type!r} (architectures={archs}); "
                f"starling_jax supports {sorted(ARCHITECTURES)}"
            )
        rope = hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", "default")
        if hf.get("rope_scaling") or rope_type != "default":
            raise CheckpointError(f"{source}: RoPE scaling {hf.get('rope_scaling') or rope} is not supported")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise CheckpointError(f"{source}: {flag}=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act={hf.get('hidden_act')!r} is not supported (only silu)")
        sliding = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        eos = hf.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0]
        try:
            return cls(
                model_type=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=int(hf["num_attention_heads"]),
                num_key_value_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
                head_dim=hf.get("head_dim"),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                sliding_window=int(sliding) if sliding else None,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=eos,
                pad_token_id=hf.get("pad_token_id"),
                initializer_range=float(hf.get("initializer_range", 0.02)),
                **runtime,
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from None

    @classmethod
    def from_hf_folder(cls, folder: str | Path, **runtime) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: no config.json in the model folder")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(hf, source=str(path), **runtime)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF config fields of this architecture (without `architectures`, which export sets)."""
        hf = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.resolved_head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": self.param_dtype,
        }
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        elif self.sliding_window is not None:
            raise CheckpointError("a Llama config cannot carry a sliding window; use model_type=mistral")
        return hf

    def architecture_dict(self) -> dict[str, Any]:
        """The fields that fix parameter shapes (compared when restoring a checkpoint)."""
        keys = (
            "model_type",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "tie_word_embeddings",
        )
        return {k: getattr(self, k) for k in keys}

    def num_params(self, head: str = "lm") -> int:
        d, f, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        hd, h, g = self.resolved_head_dim, self.num_attention_heads, self.num_key_value_heads
        per_layer = d * hd * (2 * h + 2 * g) + 3 * d * f + 2 * d
        total = v * d + n * per_layer + d
        if head == "lm" and not self.tie_word_embeddings:
            total += d * v
        elif head == "score":
            total += d
        return total

    def flops_per_token(self, seq_len: int, head: str = "score") -> float:
        """Training FLOPs per token (forward + backward = 3× forward): 6·N_matmul + attention (12·n·L·D_attn)."""
        d, f, n = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        hd, h, g = self.resolved_head_dim, self.num_attention_heads, self.num_key_value_heads
        matmul_params = n * (d * hd * (2 * h + 2 * g) + 3 * d * f)
        matmul_params += d * self.vocab_size if head == "lm" else d
        window = min(seq_len, self.sliding_window or seq_len)
        attention = 12 * n * window * h * hd / 2  # causal: half the score matrix on average
        return 6 * matmul_params + attention
