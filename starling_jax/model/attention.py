"""Attention implementations behind one rule (`model.attention_impl`).

The layout rule (ARCHITECTURE.md, "Model calling convention"): query token i attends to key token j iff

    visible(seg[i], seg[j])  and  j <= i  and  (no window or pos[i] - pos[j] < W)

    visible(a, b) = b != 0 and (a == b or (b % PREFIX_STRIDE == 0 and b // PREFIX_STRIDE == a // PREFIX_STRIDE))

Segment id 0 is padding. Ids 1 .. PREFIX_STRIDE-1 are plain segments (one sequence each: per-answer rows, packed
rows). Ids >= PREFIX_STRIDE encode a *shared-prefix group* g >= 1 as `g·PREFIX_STRIDE + b`: b = 0 marks the prompt
tokens of the group, b = 1..K its answers. An answer sees its group's prompt and itself, never a sibling answer;
a plain segment is never a prefix of anything. The window is measured in positions (an answer's positions
continue from its prompt's end, so position distance, not index distance, is the token distance), causality in
indices (every layout stores a token after everything it may see, which lets the blockwise kernel skip blocks).

Implementations (`IMPLS`):
  einsum     the reference: the [N, H, L, L] scores in float32, any layout.
  blockwise  flash-style attention in plain JAX: online softmax over key blocks, a custom VJP that recomputes
             each block's probabilities from the saved log-sum-exp; holds one [N, H, bq, bk] block at a time,
             skips key blocks after the query block (causality) and before its window. Any layout, any backend.
  fused      `jax.nn.dot_product_attention` from per-row lengths (XLA, or cuDNN on GPU for bf16/fp16): one
             right-padded plain segment per row only.
  cudnn      the same, forcing the cuDNN kernel (GPU only). jax 0.10.2's `jax.nn.dot_product_attention` takes
             lengths but no segment ids, so packed and shared-prefix layouts need `blockwise` on GPU.
  splash     the Pallas TPU splash-attention kernel (TPU only): segment ids + causal (+ local window) mask;
             handles per-answer and packed rows, not the shared-prefix rule (its segment rule is equality).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from starling_jax.errors import ConfigError

PREFIX_STRIDE = 1 << 16
IMPLS = ("einsum", "blockwise", "fused", "cudnn", "splash")
# What each implementation can attend over (see the module docstring); `check_layout` refuses the rest.
LAYOUTS = ("per_answer", "packed", "shared_prefix")
SUPPORTED_LAYOUTS = {
    "einsum": set(LAYOUTS),
    "blockwise": set(LAYOUTS),
    "fused": {"per_answer"},
    "cudnn": {"per_answer"},
    "splash": {"per_answer", "packed"},
}
_NEG = -0.5 * float(np.finfo(np.float32).max)  # finite "minus infinity": exp(_NEG - m) == 0, no inf - inf


def check_layout(impl: str, layout: str) -> None:
    """One-line ConfigError when `model.attention_impl=impl` cannot attend over `data.layout=layout`."""
    if impl not in SUPPORTED_LAYOUTS:
        raise ConfigError(f"model.attention_impl={impl!r}: choose one of {list(IMPLS)}")
    if layout not in SUPPORTED_LAYOUTS[impl]:
        ok = sorted(i for i, layouts in SUPPORTED_LAYOUTS.items() if layout in layouts)
        raise ConfigError(f"model.attention_impl={impl} cannot handle data.layout={layout} (it supports "
                          f"{sorted(SUPPORTED_LAYOUTS[impl])}); use attention_impl one of {ok}")


def visible(q_seg, k_seg):
    """The segment part of the rule, broadcasting q_seg against k_seg (see the module docstring)."""
    prefix = (k_seg % PREFIX_STRIDE == 0) & (k_seg // PREFIX_STRIDE == q_seg // PREFIX_STRIDE)
    return (k_seg != 0) & ((q_seg == k_seg) | prefix)


def allowed(q_seg, k_seg, q_pos, k_pos, q_idx, k_idx, sliding_window: int | None):
    """Boolean [..., q, k] from per-token [..., q] / [..., k] arrays (broadcast)."""
    ok = visible(q_seg[..., :, None], k_seg[..., None, :]) & (k_idx[..., None, :] <= q_idx[..., :, None])
    if sliding_window is not None:
        ok &= (q_pos[..., :, None] - k_pos[..., None, :]) < sliding_window
    return ok


def attention_mask(segment_ids, positions, sliding_window: int | None):
    """Boolean [N, 1, 1, L, L] (query, key) mask of the rule, for `einsum`."""
    idx = jnp.arange(segment_ids.shape[-1])
    return allowed(segment_ids, segment_ids, positions, positions, idx, idx, sliding_window)[:, None, None]


# ------------------------------------------------------------------------------------------------ einsum
def einsum_attention(q, k, v, mask):
    """q [N, L, H, Dh], k/v [N, L, G, Dh], mask [N, 1, 1, L, L] → [N, L, H, Dh] (the reference)."""
    return gqa_attention(q, [(k, v, mask)])


def gqa_attention(q, blocks):
    """Softmax attention of q [N, Lq, H, Dh] over the keys of all `blocks` jointly. A block is (k, v, mask) with
    k, v [N, Lk, G, Dh] and mask broadcastable to [N, 1, 1, Lq, Lk], or (k, v, mask, True) with k, v in the
    heads-first layout [N, G, Lk, Dh] (the sampler's KV cache). The H = G·R query heads read their KV head
    through a [G, R] reshape of q, never a repeated copy of k/v. Several blocks let a decode step attend over a
    KV cache and the new token without concatenating (copying) the cache.

    Scores and softmax in float32; a fully masked (padding) query row gets uniform weights over finite logits
    instead of NaN, and its output is never read."""
    n, lq, h, dh = q.shape
    blocks = [(b[0], b[1], b[2], len(b) > 3 and b[3]) for b in blocks]
    g = blocks[0][0].shape[1 if blocks[0][3] else 2]
    q = q.reshape(n, lq, g, h // g, dh)
    scale = jnp.sqrt(dh).astype(jnp.float32)
    if lq == 1:
        # One query (a decode step): multiply-and-reduce in the heads-first layout instead of dots. The work is
        # tiny either way, but a dot makes XLA transpose a copy of the whole KV cache on every step; this form
        # reads the cache where it lies.
        heads_first = lambda x, hf: x if hf else x.transpose(0, 2, 1, 3)  # → [N, G, Lk, Dh]
        qk = lambda k, hf: jnp.sum(q[:, 0, :, :, None, :].astype(jnp.float32)
                                   * heads_first(k, hf)[:, :, None].astype(jnp.float32), axis=-1)[:, :, :, None]
        pv = lambda p, v, hf: jnp.sum(p[:, :, :, 0, :, None] * heads_first(v, hf)[:, :, None], axis=3)[:, None]
    else:
        qk = lambda k, hf: jnp.einsum("nqgrk,ngsk->ngrqs" if hf else "nqgrk,nsgk->ngrqs", q, k,
                                      preferred_element_type=jnp.float32)
        pv = lambda p, v, hf: jnp.einsum("ngrqs,ngsk->nqgrk" if hf else "ngrqs,nsgk->nqgrk", p, v)
    scores = [jnp.where(mask, qk(k, hf) / scale, jnp.finfo(jnp.float32).min) for k, _, mask, hf in blocks]
    sizes = [s.shape[-1] for s in scores]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0], axis=-1)
    probs = probs.astype(q.dtype)
    out, start = 0, 0
    for (_, v, _, hf), size in zip(blocks, sizes):
        out = out + pv(probs[..., start:start + size], v, hf)
        start += size
    return out.reshape(n, lq, h, dh)


# ------------------------------------------------------------------------------------------------ fused
def fused_attention(q, k, v, lengths, sliding_window: int | None, implementation: str | None = None):
    """Causal GQA attention through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU when the compute
    dtype is bf16/fp16; XLA otherwise). q: [N, L, H, Dh], k/v: [N, L, G, Dh], lengths: int [N] real tokens per
    row (one segment, right-padded). Outputs at padding positions are unread."""
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"model.attention_impl=cudnn needs a GPU (this backend is {jax.default_backend()}); "
                          "use fused or einsum")
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        local_window_size=(sliding_window - 1, 0) if sliding_window else None, implementation=implementation)


# ------------------------------------------------------------------------------------------------ blockwise
def _kv_range(i, block_q: int, block_k: int, num_k: int):
    """Key blocks [lo, hi) that query block i may see: none after it (causality). The window is not used to
    skip blocks: it is measured in positions, and a shared prompt sits at indices far before its answers."""
    return 0, jnp.minimum((i * block_q + block_q - 1) // block_k + 1, num_k)


def _block_mask(seg, pos, i, j, block_q, block_k, window, r):
    """Boolean [N, 1, bq·R, bk]: the rule between query block i and key block j (R query heads per KV head
    share each query token's row)."""
    qs = jax.lax.dynamic_slice_in_dim(seg, i * block_q, block_q, 1)
    qp = jax.lax.dynamic_slice_in_dim(pos, i * block_q, block_q, 1)
    ks = jax.lax.dynamic_slice_in_dim(seg, j * block_k, block_k, 1)
    kp = jax.lax.dynamic_slice_in_dim(pos, j * block_k, block_k, 1)
    qi = i * block_q + jnp.arange(block_q)
    kj = j * block_k + jnp.arange(block_k)
    ok = allowed(qs, ks, qp, kp, qi, kj, window)  # [N, bq, bk]
    n = ok.shape[0]
    return jnp.broadcast_to(ok[:, :, None, :], (n, block_q, r, block_k)).reshape(n, 1, block_q * r, block_k)


def _dot(a, b, contract):
    """Batched matmul over the leading (N, G) axes, float32 accumulation. contract: "last" (a·bᵀ) or
    "rows" (aᵀ·b) or "mid" (a·b)."""
    spec = {"last": "ngqd,ngkd->ngqk", "rows": "ngqk,ngqd->ngkd", "mid": "ngqk,ngkd->ngqd"}[contract]
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _block_dims(q, k, block_q: int, block_k: int):
    """Sizes both passes share: (N, G, rows = L·R, Dh, R, query blocks, key blocks, rows per query block, 1/√Dh)."""
    n, g, rows, dh = q.shape
    r = rows // k.shape[2]
    return n, g, rows, dh, r, k.shape[2] // block_q, k.shape[2] // block_k, block_q * r, 1.0 / math.sqrt(dh)


# The kernels below work on q as [N, G, L·R, Dh] (the R query heads of a KV head folded into the rows, so every
# block product is one plain batched matmul over (N, G) with no transposes inside the loops) and k, v as
# [N, G, L, Dh]; `blockwise_attention` transposes in and out once.
def _blockwise_forward(q, k, v, seg, pos, window, block_q, block_k):
    """→ out [N, G, L·R, Dh] (q dtype), lse f32 [N, G, L·R] (0 on rows that see nothing)."""
    n, g, rows, dh, r, nq, nk, bqr, scale = _block_dims(q, k, block_q, block_k)

    def q_block(_, i):
        q_i = jax.lax.dynamic_slice_in_dim(q, i * bqr, bqr, 2)

        def kv_block(j, carry):
            acc, m, l = carry
            k_j = jax.lax.dynamic_slice_in_dim(k, j * block_k, block_k, 2)
            v_j = jax.lax.dynamic_slice_in_dim(v, j * block_k, block_k, 2)
            mask = _block_mask(seg, pos, i, j, block_q, block_k, window, r)
            s = jnp.where(mask, _dot(q_i, k_j, "last") * scale, _NEG)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            return acc * corr[..., None] + _dot(p.astype(v.dtype), v_j, "mid"), m_new, l

        init = (jnp.zeros((n, g, bqr, dh), jnp.float32), jnp.full((n, g, bqr), _NEG, jnp.float32),
                jnp.zeros((n, g, bqr), jnp.float32))
        lo, hi = _kv_range(i, block_q, block_k, nk)
        acc, m, l = jax.lax.fori_loop(lo, hi, kv_block, init)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return None, (out.astype(q.dtype), lse)

    _, (out, lse) = jax.lax.scan(q_block, None, jnp.arange(nq))  # [nq, N, G, bq·R, ...]
    out = jnp.moveaxis(out, 0, 2).reshape(n, g, rows, dh)
    lse = jnp.moveaxis(lse, 0, 2).reshape(n, g, rows)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blockwise(q, k, v, seg, pos, window, block_q, block_k):
    return _blockwise_forward(q, k, v, seg, pos, window, block_q, block_k)[0]


def _blockwise_fwd(q, k, v, seg, pos, window, block_q, block_k):
    out, lse = _blockwise_forward(q, k, v, seg, pos, window, block_q, block_k)
    return out, (q, k, v, seg, pos, out, lse)


def _blockwise_bwd(window, block_q, block_k, res, d_out):
    """FlashAttention-2 backward: per block P = exp(S - lse), dV += Pᵀ dO, dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O)),
    dQ += dS K·scale, dK += dSᵀ Q·scale."""
    q, k, v, seg, pos, out, lse = res
    n, g, rows, dh, r, nq, nk, bqr, scale = _block_dims(q, k, block_q, block_k)
    d_out = d_out.astype(q.dtype)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [N, G, L·R]

    def q_block(carry, i):
        dk, dv = carry
        q_i, do_i = (jax.lax.dynamic_slice_in_dim(x, i * bqr, bqr, 2) for x in (q, d_out))
        lse_i, delta_i = (jax.lax.dynamic_slice_in_dim(x, i * bqr, bqr, 2) for x in (lse, delta))

        def kv_block(j, inner):
            dq_i, dk, dv = inner
            k_j = jax.lax.dynamic_slice_in_dim(k, j * block_k, block_k, 2)
            v_j = jax.lax.dynamic_slice_in_dim(v, j * block_k, block_k, 2)
            mask = _block_mask(seg, pos, i, j, block_q, block_k, window, r)
            p = jnp.where(mask, jnp.exp(_dot(q_i, k_j, "last") * scale - lse_i[..., None]), 0.0)
            dv_j = _dot(p.astype(do_i.dtype), do_i, "rows")
            ds = (p * (_dot(do_i, v_j, "last") - delta_i[..., None]) * scale).astype(q.dtype)
            dq_i = dq_i + _dot(ds, k_j, "mid")
            dk_j = _dot(ds, q_i, "rows")
            start = j * block_k
            add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                acc, jax.lax.dynamic_slice_in_dim(acc, start, block_k, 2) + x, start, 2)
            return dq_i, add(dk, dk_j), add(dv, dv_j)

        lo, hi = _kv_range(i, block_q, block_k, nk)
        dq_i = jnp.zeros((n, g, bqr, dh), jnp.float32)
        dq_i, dk, dv = jax.lax.fori_loop(lo, hi, kv_block, (dq_i, dk, dv))
        return (dk, dv), dq_i

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(q_block, (zeros, zeros), jnp.arange(nq))
    dq = jnp.moveaxis(dq, 0, 2).reshape(n, g, rows, dh)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q, k, v, segment_ids, positions, sliding_window: int | None = None,
                        block_q: int = 128, block_k: int = 128):
    """Flash-style attention of the layout rule; q [N, L, H, Dh], k/v [N, L, G, Dh] → [N, L, H, Dh].

    L is padded internally (segment 0) to a multiple of the block sizes; blocks shrink to L when L is smaller.
    Outputs on rows that see no key (padding) are 0 and get no gradient."""
    length = q.shape[1]
    block_q, block_k = min(block_q, length), min(block_k, length)
    step = math.lcm(block_q, block_k)
    padded = -(-length // step) * step
    if padded != length:
        pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v, segment_ids, positions = map(pad, (q, k, v, segment_ids, positions))
    n, padded, h, dh = q.shape
    g = k.shape[2]
    # [N, L, H, Dh] → [N, G, L·R, Dh]; [N, L, G, Dh] → [N, G, L, Dh]
    qt = jnp.moveaxis(q.reshape(n, padded, g, h // g, dh), 1, 2).reshape(n, g, padded * (h // g), dh)
    kt, vt = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)
    out = _blockwise(qt, kt, vt, segment_ids.astype(jnp.int32), positions.astype(jnp.int32), sliding_window,
                     block_q, block_k)
    out = jnp.moveaxis(out.reshape(n, g, padded, h // g, dh), 2, 1).reshape(n, padded, h, dh)
    return out[:, :length]


# ------------------------------------------------------------------------------------------------ splash
def splash_attention(q, k, v, segment_ids, sliding_window: int | None = None, mesh=None, block: int = 128,
                     interpret: bool = False):
    """The Pallas TPU splash-attention kernel with segment ids and a causal (+ local window) mask.

    Plain segments only (per-answer or packed rows; the window is in indices, equal to positions there).
    Under a mesh the kernel runs per shard (`shard_map`: batch over the data axes, heads over the tensor axis).
    """
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    if platform != "tpu" and not interpret:  # an AOT compile for a TPU topology has a TPU mesh on a CPU host
        raise ConfigError(f"model.attention_impl=splash needs a TPU (these devices are {platform}); use blockwise")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    n, length, h, dh = q.shape
    padded = -(-length // block) * block
    if padded != length:
        pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v, segment_ids = map(pad, (q, k, v, segment_ids))
    shape = (padded, padded)
    one = sm.LocalMask(shape, (sliding_window - 1, 0), 0) if sliding_window else sm.CausalMask(shape)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

    def per_shard(q, k, v, seg):
        heads = q.shape[2]
        kernel = sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
        # the kernel takes [heads, L, Dh] per example and does not scale q; padding (segment 0) sees padding only
        t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        run = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1))  # noqa: E731
        out = jax.vmap(run)(t(q * (1.0 / math.sqrt(dh))).astype(q.dtype), t(k), t(v), seg)
        return t(out)

    if mesh is not None and mesh.size > 1:
        from jax.sharding import PartitionSpec as P

        from starling_jax.parallel.sharding import logical_to_spec

        heads = logical_to_spec(("act_batch", None, "act_heads", None), q.shape, mesh)
        kv = logical_to_spec(("act_batch", None, "act_kv_heads", None), k.shape, mesh)
        seg = P(heads[0], None)
        per_shard = jax.shard_map(per_shard, mesh=mesh, in_specs=(heads, kv, kv, seg), out_specs=heads,
                                  check_vma=False)
    return per_shard(q, k, v, segment_ids.astype(jnp.int32))[:, :length]


# ------------------------------------------------------------------------------------------------ dispatch
def prepare(cfg, segment_ids, positions):
    """What `attend` needs, computed once per forward pass (shared by all layers): the [N, 1, 1, L, L] mask
    (einsum), per-row lengths (fused, cudnn) or (segment_ids, positions) (blockwise, splash)."""
    if cfg.attention_impl == "einsum":
        return attention_mask(segment_ids, positions, cfg.sliding_window)
    if cfg.attention_impl in ("fused", "cudnn"):
        return jnp.sum(segment_ids != 0, axis=-1).astype(jnp.int32)
    return segment_ids, positions


def attend(cfg, q, k, v, context):
    """q [N, L, H, Dh], k/v [N, L, G, Dh] (after RoPE) → [N, L, H, Dh] with `cfg.attention_impl`."""
    impl = cfg.attention_impl
    if impl == "einsum":
        return einsum_attention(q, k, v, context)
    if impl in ("fused", "cudnn"):
        return fused_attention(q, k, v, context, cfg.sliding_window, "cudnn" if impl == "cudnn" else None)
    segment_ids, positions = context
    if impl == "blockwise":
        return blockwise_attention(q, k, v, segment_ids, positions, cfg.sliding_window,
                                   cfg.attention_block, cfg.attention_block)
    if impl == "splash":
        from starling_jax.parallel.sharding import active_mesh

        return splash_attention(q, k, v, segment_ids, cfg.sliding_window, mesh=active_mesh())
    raise ConfigError(f"model.attention_impl={impl!r}: choose one of {list(IMPLS)}")
