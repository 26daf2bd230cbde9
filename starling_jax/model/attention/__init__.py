"""Attention: one layout rule (`rule.py`), computed by the implementation `runtime.attention_impl` names in the
registry (`registry.py`). Every caller selects through the registry: the decoder and the RL hydra (`prepare`,
`attend`), the decoder's selected rows and the sampler's KV cache (`attend_cached`), config validation
(`check_impl`, `check_layout`) and `aot`'s report (`resolve`).

The entries, one module each (what each declares: its layouts, platforms, `prepare`, `attend`, cached path):
  einsum     the reference: the [N, H, L, L] scores in float32, any layout; its cached path serves all.
  blockwise  flash-style attention in plain JAX (online softmax over key blocks, custom VJP, dead block pairs
             skipped; a strip form for short rows on CPU, `resolve_blocks`), any layout, any platform.
  fused      `jax.nn.dot_product_attention` from per-row lengths: one right-padded plain segment per row only.
  cudnn      the same, forcing the cuDNN kernel (GPU only).
  splash     the Pallas TPU splash-attention kernel (TPU only), any layout but a shared prefix under a window
             shorter than the row.
  auto       not an entry: resolved when the program is traced, from the platform of the mesh it runs on
             (`registry.AUTO`: splash on TPU, blockwise on GPU, einsum elsewhere).

A new implementation is one `Implementation(...)` entry, registered (`register`, `with registered(...)`; the
built-ins below, in the tuple at the end of the imports): its name is then a valid `runtime.attention_impl`
everywhere.
"""

from __future__ import annotations

from starling_jax.model.attention.blockwise import (
    BLOCKS,
    BLOCKWISE,
    STRIP_BLOCK,
    STRIPS,
    blockwise_attention,
    resolve_blocks,
)
from starling_jax.model.attention.einsum import EINSUM, einsum_attention, gqa_attention
from starling_jax.model.attention.fused import CUDNN, FUSED, fused_attention
from starling_jax.model.attention.registry import (
    AUTO,
    REFERENCE,
    Implementation,
    attend,
    attend_cached,
    candidates,
    check_impl,
    check_layout,
    get,
    layouts,
    names,
    prepare,
    register,
    registered,
    resolve,
    select,
    trace_platform,
    unregister,
)
from starling_jax.model.attention.rule import (
    LAYOUTS,
    PREFIX_BITS,
    PREFIX_STRIDE,
    allowed,
    attention_mask,
    rows_mask,
    take_rows,
    visible,
)
from starling_jax.model.attention.splash import SPLASH, splash_attention

# the built-in entries, in the order `names()` lists them (and config errors offer them)
for _entry in (EINSUM, BLOCKWISE, FUSED, CUDNN, SPLASH):
    register(_entry)
del _entry

__all__ = [
    "AUTO",
    "BLOCKS",
    "BLOCKWISE",
    "CUDNN",
    "EINSUM",
    "FUSED",
    "LAYOUTS",
    "PREFIX_BITS",
    "PREFIX_STRIDE",
    "REFERENCE",
    "SPLASH",
    "STRIPS",
    "STRIP_BLOCK",
    "Implementation",
    "allowed",
    "attend",
    "attend_cached",
    "attention_mask",
    "blockwise_attention",
    "candidates",
    "check_impl",
    "check_layout",
    "einsum_attention",
    "fused_attention",
    "get",
    "gqa_attention",
    "layouts",
    "names",
    "prepare",
    "register",
    "registered",
    "resolve",
    "resolve_blocks",
    "rows_mask",
    "select",
    "splash_attention",
    "take_rows",
    "trace_platform",
    "unregister",
    "visible",
]


def __getattr__(name: str):
    # `IMPLS` (every valid `runtime.attention_impl`) read from the registry when asked for, so it includes entries
    # registered after this import
    if name == "IMPLS":
        return names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
