"""`blockwise`: flash-style attention in plain JAX, any layout, any platform.

Online softmax over key blocks, a custom VJP that recomputes each block's probabilities from the saved
log-sum-exp; it holds one [N, H, bq, bk] block at a time, skips key blocks after the query block (causality) and
block pairs no token pair of any row can see (other segments, sibling answers, padding). Short rows on CPU take
its strip form instead (`resolve_blocks`): each query block against all keys up to its causal bound in one
block, the query blocks unrolled. No cached path: a decode step's single query reads the cache in the
reference's form already (`einsum.gqa_attention`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from starling_jax.model.attention.registry import Implementation, trace_platform
from starling_jax.model.attention.rule import LAYOUTS, PREFIX_STRIDE, allowed

BLOCKS = {"cpu": 256}  # platform → blockwise block length for `model.attention_block: 0` (else 128)
STRIPS = {"cpu": 512}  # platform → the longest row that `attention_block: 0` gives blockwise's strip form
STRIP_BLOCK = 64  # the strip form's query block for `attention_block: 0`
_NEG = -0.5 * float(np.finfo(np.float32).max)  # finite "minus infinity": exp(_NEG - m) == 0, no inf - inf


def resolve_blocks(block: int, length: int, platform: str | None = None) -> tuple[int, int | None]:
    """(block_q, block_k) of `blockwise_attention` for rows of `length` tokens: (block, block) for an explicit
    `model.attention_block`; with 0, by `platform` (default: `trace_platform()`). On CPU, rows of at most
    `STRIPS["cpu"]` tokens take the strip form (block_k None) with 64-token query blocks; longer rows loop over
    256-token blocks. There XLA's per-block loop and branch cost more than the causal blocks a small block
    skips, so 256 beats 128 in the loop; the unrolled strips beat both up to 512 tokens, packed rows included,
    but at 1024 lose to the loop on packed rows, whose other segments' blocks only the loop skips (BENCHMARKS.md,
    "Train step vs PyTorch"). Elsewhere 128-token blocks in the loop."""
    if block:
        return block, block
    platform = platform or trace_platform()
    if length <= STRIPS.get(platform, 0):
        return STRIP_BLOCK, None
    block = BLOCKS.get(platform, 128)
    return block, block


def _kv_range(i, block_q: int, block_k: int, num_k: int):
    """Key blocks [lo, hi) that query block i may see: none after it (causality). The window is not used to
    skip blocks: it is measured in positions, and a shared prompt sits at indices far before its answers."""
    return 0, jnp.minimum((i * block_q + block_q - 1) // block_k + 1, num_k)


def _live_blocks(seg, block_q: int, block_k: int):
    """Boolean [query blocks, key blocks]: False where no token of the query block can see any token of the key
    block in any row, so both passes skip the pair (a packed row's other segments, a shared prompt's sibling
    answers, padding). Conservative: each block is summarized per row by the [min, max] of (a) its segment ids
    and (b) the group numbers of its answers (queries) or prompts (keys); a pair is live when (a) or (b)
    overlaps in some row. Exactness stays with `_strip_mask`; this only decides what need not be computed.
    O(N · blocks²) work, never [L, L]."""
    big = jnp.iinfo(jnp.int32).max
    grouped = seg >= PREFIX_STRIDE
    prompt = grouped & (seg % PREFIX_STRIDE == 0)
    group = seg // PREFIX_STRIDE

    def ranges(values, keep, block):  # → ([N, blocks] min, [N, blocks] max) over the kept tokens
        n, length = values.shape
        v = values.reshape(n, length // block, block)
        k = keep.reshape(n, length // block, block)
        return jnp.where(k, v, big).min(-1), jnp.where(k, v, -big).max(-1)

    def overlap(a, b):  # [N, nq] ranges vs [N, nk] ranges → [N, nq, nk]
        return (a[0][:, :, None] <= b[1][:, None, :]) & (b[0][:, None, :] <= a[1][:, :, None])

    real = seg != 0
    same = overlap(ranges(seg, real, block_q), ranges(seg, real, block_k))
    prefix = overlap(ranges(group, grouped & ~prompt, block_q), ranges(group, prompt, block_k))
    return jnp.any(same | prefix, axis=0)


def _strip_mask(seg, pos, i, block_q, window, r):
    """Boolean [N, 1, bq·R, L]: the rule between query block i and every key (R query heads per KV head share
    each query token's row). Built once per query block, outside the key loop, and handed to the loop body as
    an operand, which makes XLA store it: the loop body slices it per key block (`_key_block`). Built inside the
    body instead, XLA fuses the rule into each consumer of the scores and evaluates it for every [G, R] copy of
    every element (the CPU forward 2-4x slower at L = 256, BENCHMARKS.md)."""
    qs = jax.lax.dynamic_slice_in_dim(seg, i * block_q, block_q, 1)
    qp = jax.lax.dynamic_slice_in_dim(pos, i * block_q, block_q, 1)
    qi = i * block_q + jnp.arange(block_q)
    ok = allowed(qs, seg, qp, pos, qi, jnp.arange(seg.shape[1]), window)  # [N, bq, L]
    n, _, length = ok.shape
    return jnp.broadcast_to(ok[:, :, None, :], (n, block_q, r, length)).reshape(n, 1, block_q * r, length)


def _key_block(strip, j, block_k):
    """Key block j of a `_strip_mask`: [N, 1, bq·R, bk]."""
    return jax.lax.dynamic_slice_in_dim(strip, j * block_k, block_k, 3)


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
    live = _live_blocks(seg, block_q, block_k)

    def q_block(_, i):
        q_i = jax.lax.dynamic_slice_in_dim(q, i * bqr, bqr, 2)
        strip = _strip_mask(seg, pos, i, block_q, window, r)

        def kv_block(j, carry):
            return jax.lax.cond(live[i, j], functools.partial(visit, j), lambda c: c, carry)

        def visit(j, carry):
            acc, m, l = carry
            k_j = jax.lax.dynamic_slice_in_dim(k, j * block_k, block_k, 2)
            v_j = jax.lax.dynamic_slice_in_dim(v, j * block_k, block_k, 2)
            mask = _key_block(strip, j, block_k)
            s = jnp.where(mask, _dot(q_i, k_j, "last") * scale, _NEG)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            return acc * corr[..., None] + _dot(p.astype(v.dtype), v_j, "mid"), m_new, l

        init = (
            jnp.zeros((n, g, bqr, dh), jnp.float32),
            jnp.full((n, g, bqr), _NEG, jnp.float32),
            jnp.zeros((n, g, bqr), jnp.float32),
        )
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


def _by_row(per_row: bool, fn, *arrays):
    """fn over each row of the leading axis in turn (`lax.map`) when per_row, else once over the batch. Rows
    in turn let each row skip its own dead block pairs (`_live_blocks`); over a batch only the pairs dead in
    every row are skipped, and in a batch of packed rows that is almost none."""
    if not per_row or arrays[0].shape[0] == 1:
        return fn(*arrays)
    one = lambda xs: jax.tree.map(lambda y: y[0], fn(*jax.tree.map(lambda x: x[None], xs)))  # noqa: E731
    return jax.lax.map(one, arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _blockwise(q, k, v, seg, pos, window, block_q, block_k, per_row):
    return _blockwise_fwd(q, k, v, seg, pos, window, block_q, block_k, per_row)[0]


def _blockwise_fwd(q, k, v, seg, pos, window, block_q, block_k, per_row):
    if block_k is None:
        masks = _strip_masks(seg, pos, block_q, window, q.shape[2] // k.shape[2])
        out, lse = _by_row(per_row, lambda *a: _strip_forward(*a, block_q), q, k, v, masks)
    else:
        out, lse = _by_row(per_row, lambda *a: _blockwise_forward(*a, window, block_q, block_k), q, k, v, seg, pos)
    return out, (q, k, v, seg, pos, out, lse)


def _blockwise_bwd(window, block_q, block_k, per_row, res, d_out):
    q, k, v, seg, pos, out, lse = res
    if block_k is None:
        masks = _strip_masks(seg, pos, block_q, window, q.shape[2] // k.shape[2])
        grads = _by_row(per_row, lambda *a: _strip_backward(*a, block_q), q, k, v, masks, out, lse, d_out)
    else:
        grads = _by_row(per_row, lambda *a: _blockwise_backward(*a, window, block_q, block_k), *res, d_out)
    return (*grads, None, None)


def _blockwise_backward(q, k, v, seg, pos, out, lse, d_out, window, block_q, block_k):
    """FlashAttention-2 backward: per block P = exp(S - lse), dV += Pᵀ dO, dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O)),
    dQ += dS K·scale, dK += dSᵀ Q·scale."""
    n, g, rows, dh, r, nq, nk, bqr, scale = _block_dims(q, k, block_q, block_k)
    d_out = d_out.astype(q.dtype)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [N, G, L·R]
    live = _live_blocks(seg, block_q, block_k)

    def q_block(carry, i):
        dk, dv = carry
        q_i, do_i = (jax.lax.dynamic_slice_in_dim(x, i * bqr, bqr, 2) for x in (q, d_out))
        lse_i, delta_i = (jax.lax.dynamic_slice_in_dim(x, i * bqr, bqr, 2) for x in (lse, delta))
        strip = _strip_mask(seg, pos, i, block_q, window, r)

        def kv_block(j, inner):
            return jax.lax.cond(live[i, j], functools.partial(visit, j), lambda c: c, inner)

        def visit(j, inner):
            dq_i, dk, dv = inner
            k_j = jax.lax.dynamic_slice_in_dim(k, j * block_k, block_k, 2)
            v_j = jax.lax.dynamic_slice_in_dim(v, j * block_k, block_k, 2)
            mask = _key_block(strip, j, block_k)
            p = jnp.where(mask, jnp.exp(_dot(q_i, k_j, "last") * scale - lse_i[..., None]), 0.0)
            dv_j = _dot(p.astype(do_i.dtype), do_i, "rows")
            ds = (p * (_dot(do_i, v_j, "last") - delta_i[..., None]) * scale).astype(q.dtype)
            dq_i = dq_i + _dot(ds, k_j, "mid")
            dk_j = _dot(ds, q_i, "rows")
            start = j * block_k
            add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                acc, jax.lax.dynamic_slice_in_dim(acc, start, block_k, 2) + x, start, 2
            )
            return dq_i, add(dk, dk_j), add(dv, dv_j)

        lo, hi = _kv_range(i, block_q, block_k, nk)
        dq_i = jnp.zeros((n, g, bqr, dh), jnp.float32)
        dq_i, dk, dv = jax.lax.fori_loop(lo, hi, kv_block, (dq_i, dk, dv))
        return (dk, dv), dq_i

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(q_block, (zeros, zeros), jnp.arange(nq))
    dq = jnp.moveaxis(dq, 0, 2).reshape(n, g, rows, dh)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# The strip form (`block_k=None`): query block i attends to keys [0, (i + 1)·bq) — everything up to its causal
# bound — as one block, with the query blocks unrolled (static shapes). No online softmax, no loop or branch per
# block pair, and causality still skips the keys after each query block: at L = 256 with 64-token query blocks,
# 6 of 16 block pairs. For rows of up to 512 tokens on CPU, where XLA's per-block loop and branch cost more than
# the key blocks they skip (`resolve_blocks`). Row by row (`_by_row`), XLA may keep all of a row's strips live:
# about one row's [H, L, L] scores at a time (never the batch's), another reason it is for short rows only.
def _strip_masks(seg, pos, block_q, window, r):
    """The `_strip_mask` of every query block cut at its causal bound: [N, 1, bq·R, (i + 1)·bq] for block i.
    Built over the whole batch before the per-row loop and stored (its operand, and the barrier when there is
    no loop), for the reason `_strip_mask` gives: fused into the scores' consumers, the rule is evaluated per
    score element, and the strip form's CPU attention ran 2x slower than with the masks stored."""
    nq = seg.shape[1] // block_q
    return jax.lax.optimization_barrier(
        [_strip_mask(seg, pos, i, block_q, window, r)[..., : (i + 1) * block_q] for i in range(nq)]
    )


def _strip_forward(q, k, v, masks, block_q):
    """→ out [N, G, L·R, Dh] (q dtype), lse f32 [N, G, L·R] (0 on rows that see nothing); as `_blockwise_forward`,
    with `_strip_masks`."""
    n, g, rows, dh, r, nq, _, bqr, scale = _block_dims(q, k, block_q, block_q)
    outs, lses = [], []
    for i, mask in enumerate(masks):
        keys = (i + 1) * block_q
        s = jnp.where(mask, _dot(q[:, :, i * bqr : (i + 1) * bqr], k[:, :, :keys], "last") * scale, _NEG)
        m = s.max(-1)
        p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
        l = p.sum(-1)
        seen = l > 0
        out = _dot(p.astype(v.dtype), v[:, :, :keys], "mid") / jnp.where(seen, l, 1.0)[..., None]
        outs.append(out.astype(q.dtype))
        lses.append(jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0))
    return jnp.concatenate(outs, 2), jnp.concatenate(lses, 2)


def _strip_backward(q, k, v, masks, out, lse, d_out, block_q):
    """The backward of `_strip_forward`, per query block as in `_blockwise_backward`; dK and dV accumulate over
    the query blocks on their key prefixes."""
    n, g, rows, dh, r, nq, _, bqr, scale = _block_dims(q, k, block_q, block_q)
    d_out = d_out.astype(q.dtype)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [N, G, L·R]
    dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32)
    for i, mask in enumerate(masks):
        keys, sl = (i + 1) * block_q, slice(i * bqr, (i + 1) * bqr)
        q_i, do_i, lse_i, delta_i = q[:, :, sl], d_out[:, :, sl], lse[:, :, sl], delta[:, :, sl]
        k_s, v_s = k[:, :, :keys], v[:, :, :keys]
        p = jnp.where(mask, jnp.exp(_dot(q_i, k_s, "last") * scale - lse_i[..., None]), 0.0)
        dv = dv.at[:, :, :keys].add(_dot(p.astype(do_i.dtype), do_i, "rows"))
        ds = (p * (_dot(do_i, v_s, "last") - delta_i[..., None]) * scale).astype(q.dtype)
        dq.append(_dot(ds, k_s, "mid"))
        dk = dk.at[:, :, :keys].add(_dot(ds, q_i, "rows"))
    return jnp.concatenate(dq, 2).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(
    q,
    k,
    v,
    segment_ids,
    positions,
    sliding_window: int | None = None,
    block_q: int = 128,
    block_k: int | None = 128,
    per_row: bool = True,
):
    """Flash-style attention of the layout rule; q [N, L, H, Dh], k/v [N, L, G, Dh] → [N, L, H, Dh].

    block_k None: the strip form (each query block against all keys up to its causal bound, `_strip_forward`),
    else online softmax over key blocks of block_k in a loop. L is padded internally (segment 0) to a multiple
    of the block sizes; blocks shrink to L when L is smaller. Outputs on rows that see no key (padding) are 0
    and get no gradient."""
    length = q.shape[1]
    block_q = min(block_q, length)
    block_k = None if block_k is None else min(block_k, length)
    step = block_q if block_k is None else math.lcm(block_q, block_k)
    padded = -(-length // step) * step
    if padded != length:
        pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v, segment_ids, positions = map(pad, (q, k, v, segment_ids, positions))
    n, padded, h, dh = q.shape
    g = k.shape[2]
    # [N, L, H, Dh] → [N, G, L·R, Dh]; [N, L, G, Dh] → [N, G, L, Dh]
    qt = jnp.moveaxis(q.reshape(n, padded, g, h // g, dh), 1, 2).reshape(n, g, padded * (h // g), dh)
    kt, vt = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)
    out = _blockwise(
        qt,
        kt,
        vt,
        segment_ids.astype(jnp.int32),
        positions.astype(jnp.int32),
        sliding_window,
        block_q,
        block_k,
        per_row,
    )
    out = jnp.moveaxis(out.reshape(n, g, padded, h // g, dh), 2, 1).reshape(n, padded, h, dh)
    return out[:, :length]


def _prepare(cfg, segment_ids, positions):
    return segment_ids, positions


def _attend(cfg, q, k, v, context):
    segment_ids, positions = context
    blocks = resolve_blocks(cfg.attention_block, q.shape[1])
    return blockwise_attention(q, k, v, segment_ids, positions, cfg.sliding_window, *blocks)


BLOCKWISE = Implementation(
    name="blockwise", layouts=frozenset(LAYOUTS), platforms=None, prepare=_prepare, attend=_attend
)
