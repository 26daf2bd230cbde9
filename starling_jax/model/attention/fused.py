"""`fused` and `cudnn`: `jax.nn.dot_product_attention` from per-row lengths (XLA, or cuDNN on GPU for bf16/fp16),
for one right-padded plain segment per row only (`per_answer`). `cudnn` forces the cuDNN kernel (GPU only).
jax 0.10.2's `jax.nn.dot_product_attention` takes lengths but no segment ids, so packed and shared-prefix layouts
need `blockwise` on GPU. No cached path: the sampler's left-padded cache is not a length."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from starling_jax.errors import ConfigError
from starling_jax.model.attention.registry import Implementation


def fused_attention(q, k, v, lengths, sliding_window: int | None, implementation: str | None = None):
    """Causal GQA attention through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU when the compute
    dtype is bf16/fp16; XLA otherwise). q: [N, L, H, Dh], k/v: [N, L, G, Dh], lengths: int [N] real tokens per
    row (one segment, right-padded). Outputs at padding positions are unread."""
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(
            f"runtime.attention_impl=cudnn needs a GPU (this backend is {jax.default_backend()}); use fused or einsum"
        )
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        local_window_size=(sliding_window - 1, 0) if sliding_window else None,
        implementation=implementation,
    )


def _prepare(cfg, segment_ids, positions):
    return jnp.sum(segment_ids != 0, axis=-1).astype(jnp.int32)


def _attend(cfg, q, k, v, lengths):
    return fused_attention(q, k, v, lengths, cfg.sliding_window)


def _attend_cudnn(cfg, q, k, v, lengths):
    return fused_attention(q, k, v, lengths, cfg.sliding_window, "cudnn")


FUSED = Implementation(
    name="fused", layouts=frozenset({"per_answer"}), platforms=None, prepare=_prepare, attend=_attend
)
CUDNN = Implementation(
    name="cudnn",
    layouts=frozenset({"per_answer"}),
    platforms=frozenset({"gpu"}),
    prepare=_prepare,
    attend=_attend_cudnn,
)
