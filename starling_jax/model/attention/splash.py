"""`splash`: the Pallas TPU splash-attention kernel (TPU only), any layout.

Segment ids + causal (+ local window) mask; the shared-prefix rule as two kernel passes merged by log-sum-exp (its
segment rule is equality). Not a shared prefix with a window shorter than the row (the window is in indices;
`refuses`). No cached path: the sampler's decode steps use the reference's.

The Pallas modules are imported inside the functions that build a kernel: they add about 1.5 s to every import of
the model otherwise, and only a splash program needs them. The two-pass backward calls the kernel's own backward
(`sk._splash_attention_bwd`, private in jax 0.10.2) with the merged residuals; see `_splash_prefix_bwd`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from starling_jax.errors import ConfigError
from starling_jax.model.attention.registry import Implementation
from starling_jax.model.attention.rule import LAYOUTS, PREFIX_STRIDE
from starling_jax.parallel.sharding import active_mesh, logical_to_spec


def _splash_kernel(
    heads: int, length: int, sliding_window: int | None, block: int, interpret: bool, save_residuals: bool = False
):
    """The splash kernel for one example ([heads, length, Dh]): causal (+ local window, in indices) static mask,
    equal blocks for the forward and both backward passes."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    shape = (length, length)
    one = sm.LocalMask(shape, (sliding_window - 1, 0), 0) if sliding_window else sm.CausalMask(shape)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return sk.make_splash_mha(
        sm.MultiHeadMask([one] * heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
        save_residuals=save_residuals,
    )


def _prefix_passes(seg):
    """Splash's segment rule is equality, so the prefix rule runs as two passes over disjoint key sets whose
    union is what each query may see (module docstring):
      own     every token within its own segment (a prompt sees its prompt, an answer its own tokens);
      prompt  an answer's queries over its group's prompt keys; everything else sees nothing (-1 ≠ -2)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    grouped = seg >= PREFIX_STRIDE
    is_prompt = grouped & (seg % PREFIX_STRIDE == 0)
    q_prompt = jnp.where(grouped & ~is_prompt, seg - seg % PREFIX_STRIDE, -1)
    kv_prompt = jnp.where(is_prompt, seg, -2)
    return sk.SegmentIds(q=seg, kv=seg), sk.SegmentIds(q=q_prompt, kv=kv_prompt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _splash_prefix(q, k, v, seg, sliding_window, block, interpret):
    return _splash_prefix_fwd(q, k, v, seg, sliding_window, block, interpret)[0]


def _splash_prefix_fwd(q, k, v, seg, sliding_window, block, interpret):
    """Both passes with their log-sum-exps, merged as one softmax: out = Σ exp(lse_p - lse)·out_p."""
    kernel = _splash_kernel(q.shape[0], q.shape[1], sliding_window, block, interpret, save_residuals=True)
    outs, lses = zip(*[(o, r[0]) for o, r in (kernel(q, k, v, segment_ids=ids) for ids in _prefix_passes(seg))])
    # a pass whose row sees nothing reports lse ≈ mask_value (-0.7·f32 max): its weight below is exactly 0
    lse = jnp.logaddexp(*lses)
    out = sum(jnp.exp(p_lse - lse)[..., None] * o.astype(jnp.float32) for o, p_lse in zip(outs, lses))
    out = out.astype(q.dtype)
    return out, (q, k, v, seg, out, lse)


def _splash_prefix_bwd(sliding_window, block, interpret, res, d_out):
    """Each pass's splash backward, fed the *merged* output and log-sum-exp: then its P = exp(S - lse) and
    dS = P ∘ (dP - rowsum(dO ∘ O)) are the merged softmax's restricted to that pass's keys (as in ring
    attention), and the passes' dq, dk, dv add up to the merged attention's gradients."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    q, k, v, seg, out, lse = res
    kernel = _splash_kernel(q.shape[0], q.shape[1], sliding_window, block, interpret)
    kw = kernel.kwargs
    # what the kernel's own jitted wrapper does to the mask infos before its custom VJP sees them
    collapse = (
        lambda info: (
            info
            if info is None or info.partial_mask_blocks is None
            else info._replace(  # noqa: E731
                partial_mask_blocks=info.partial_mask_blocks.reshape(-1, *info.partial_mask_blocks.shape[-2:])
            )
        )
    )
    grads = None
    for ids in _prefix_passes(seg):
        residuals = (q, k, v, ids, None, out, lse, collapse(kernel.dq_mask_info), collapse(kernel.dkv_mask_info))
        _, _, _, dq, dk, dv, _, _ = sk._splash_attention_bwd(
            False,
            kw["mask_value"],
            kw["is_mqa"],
            kw["block_sizes"],
            None,
            kw["mask_function"],
            kw["attn_logits_soft_cap"],
            interpret,
            residuals,
            d_out,
        )
        grads = (dq, dk, dv) if grads is None else tuple(a + b for a, b in zip(grads, (dq, dk, dv)))
    return (*grads, None)


_splash_prefix.defvjp(_splash_prefix_fwd, _splash_prefix_bwd)


def splash_attention(
    q, k, v, segment_ids, sliding_window: int | None = None, mesh=None, block: int = 128, interpret: bool = False
):
    """The Pallas TPU splash-attention kernel with segment ids and a causal (+ local window) mask, and the
    shared-prefix rule. q [N, L, H, Dh], k/v [N, L, G, Dh] → [N, L, H, Dh].

    Plain segments (per-answer, packed rows) run the kernel once. Rows with shared-prefix groups run it twice
    (`_prefix_passes`), merged by log-sum-exp with a custom VJP; which of the two programs runs is decided per
    shard at run time (`lax.cond`), so a batch whose rows all fell back to plain segments pays for one pass. The
    window is in indices, equal to positions within a segment; between an answer and its prompt it is not (the
    siblings' tokens lie between them), so a shared-prefix batch with a window shorter than the padded length
    gives NaN outputs here: the trainers refuse that configuration up front (`check_layout`).
    Under a mesh the kernel runs per shard (`shard_map`: batch over the data axes, heads over the tensor axis).
    """
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    if platform != "tpu" and not interpret:  # an AOT compile for a TPU topology has a TPU mesh on a CPU host
        raise ConfigError(f"runtime.attention_impl=splash needs a TPU (these devices are {platform}); use blockwise")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    n, length, h, dh = q.shape
    padded = -(-length // block) * block
    if padded != length:
        pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v, segment_ids = map(pad, (q, k, v, segment_ids))
    window_bites = bool(sliding_window) and sliding_window < padded

    def per_shard(q, k, v, seg):
        # the kernel takes [heads, L, Dh] per example and does not scale q; padding (segment 0) sees padding only
        t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        q, k, v = t(q * (1.0 / math.sqrt(dh))).astype(q.dtype), t(k), t(v)
        kernel = _splash_kernel(q.shape[1], padded, sliding_window, block, interpret)

        def plain(q, k, v, seg):
            return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1)))(
                q, k, v, seg
            )

        def prefix(q, k, v, seg):
            if window_bites:
                return jnp.full(q.shape, jnp.nan, q.dtype)
            return jax.vmap(lambda q1, k1, v1, s1: _splash_prefix(q1, k1, v1, s1, sliding_window, block, interpret))(
                q, k, v, seg
            )

        out = jax.lax.cond(jnp.any(seg >= PREFIX_STRIDE), prefix, plain, q, k, v, seg)
        return t(out)

    if mesh is not None and mesh.size > 1:
        heads = logical_to_spec(("act_batch", None, "act_heads", None), q.shape, mesh)
        kv = logical_to_spec(("act_batch", None, "act_kv_heads", None), k.shape, mesh)
        seg = P(heads[0], None)
        per_shard = jax.shard_map(per_shard, mesh=mesh, in_specs=(heads, kv, kv, seg), out_specs=heads, check_vma=False)
    return per_shard(q, k, v, segment_ids.astype(jnp.int32))[:, :length]


def _prepare(cfg, segment_ids, positions):
    return segment_ids, positions


def _attend(cfg, q, k, v, context):
    segment_ids, _ = context
    return splash_attention(q, k, v, segment_ids, cfg.sliding_window, mesh=active_mesh())


def _refuses(layout: str, sliding_window: int | None, max_length: int | None) -> str | None:
    if layout == "shared_prefix" and sliding_window and max_length and sliding_window < max_length:
        return (
            f"with a sliding window ({sliding_window}) shorter than data.max_length ({max_length}): its window "
            "is in indices, and a prompt's answers lie at different distances from it; use attention_impl "
            "blockwise"
        )
    return None


SPLASH = Implementation(
    name="splash",
    layouts=frozenset(LAYOUTS),
    platforms=frozenset({"tpu"}),
    prepare=_prepare,
    attend=_attend,
    refuses=_refuses,
)
