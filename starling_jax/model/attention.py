"""Attention implementations behind one rule (`runtime.attention_impl` of every trainer, `ModelConfig.attention_impl`).

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
             skips key blocks after the query block (causality) and block pairs no token pair of any row can
             see (other segments, sibling answers, padding). Any layout, any backend. Short rows on CPU take
             its strip form instead (`resolve_blocks`): each query block against all keys up to its causal
             bound in one block, the query blocks unrolled.
  fused      `jax.nn.dot_product_attention` from per-row lengths (XLA, or cuDNN on GPU for bf16/fp16): one
             right-padded plain segment per row only.
  cudnn      the same, forcing the cuDNN kernel (GPU only). jax 0.10.2's `jax.nn.dot_product_attention` takes
             lengths but no segment ids, so packed and shared-prefix layouts need `blockwise` on GPU.
  splash     the Pallas TPU splash-attention kernel (TPU only): segment ids + causal (+ local window) mask; the
             shared-prefix rule as two kernel passes merged by log-sum-exp (its segment rule is equality). Any
             layout, but not a shared prefix with a window shorter than the row (the window is in indices).
  auto       resolved when the program is traced, from the platform of the mesh it runs on (`resolve`): splash
             on TPU, blockwise on GPU (any layout, never the scores), einsum elsewhere. One recipe then serves a
             TPU pod, a GPU cluster and an ahead-of-time compile for a TPU topology on a CPU host.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from starling_jax.errors import ConfigError

PREFIX_BITS = 16
PREFIX_STRIDE = 1 << PREFIX_BITS
IMPLS = ("einsum", "blockwise", "fused", "cudnn", "splash", "auto")
AUTO = {"tpu": "splash", "gpu": "blockwise"}  # platform → implementation for `auto` (else einsum)
BLOCKS = {"cpu": 256}  # platform → blockwise block length for `runtime.attention_block: 0` (else 128)
STRIPS = {"cpu": 512}  # platform → the longest row that `attention_block: 0` gives blockwise's strip form
STRIP_BLOCK = 64  # the strip form's query block for `attention_block: 0`
# What each implementation can attend over (see the module docstring); `check_layout` refuses the rest.
# left_padded: one segment per row after left padding (RL rollouts: prompt, then completion); fused/cudnn take
# per-row lengths, i.e. rows that start at index 0.
LAYOUTS = ("per_answer", "packed", "shared_prefix", "left_padded")
SUPPORTED_LAYOUTS = {
    "einsum": set(LAYOUTS),
    "blockwise": set(LAYOUTS),
    "fused": {"per_answer"},
    "cudnn": {"per_answer"},
    "splash": set(LAYOUTS),
    "auto": set(LAYOUTS),
}
_NEG = -0.5 * float(np.finfo(np.float32).max)  # finite "minus infinity": exp(_NEG - m) == 0, no inf - inf


def check_layout(impl: str, layout: str, sliding_window: int | None = None, max_length: int | None = None,
                 what: str | None = None) -> None:
    """One-line ConfigError when `runtime.attention_impl=impl` cannot attend over `data.layout=layout` (rows of
    `max_length` tokens, with the model's `sliding_window`); `what` names the layout in the message (default
    `data.layout=<layout>`)."""
    if impl not in SUPPORTED_LAYOUTS:
        raise ConfigError(f"runtime.attention_impl={impl!r}: choose one of {list(IMPLS)}")
    if layout not in SUPPORTED_LAYOUTS[impl]:
        ok = sorted(i for i, layouts in SUPPORTED_LAYOUTS.items() if layout in layouts)
        raise ConfigError(f"runtime.attention_impl={impl} cannot handle {what or f'data.layout={layout}'} (it "
                          f"supports {sorted(SUPPORTED_LAYOUTS[impl])}); use attention_impl one of {ok}")
    bites = sliding_window and max_length and sliding_window < max_length
    if impl in ("splash", "auto") and layout == "shared_prefix" and bites:
        raise ConfigError(f"runtime.attention_impl={impl} cannot handle data.layout=shared_prefix with a sliding window "
                          f"({sliding_window}) shorter than data.max_length ({max_length}): its window is in indices, "
                          "and a prompt's answers lie at different distances from it; use attention_impl blockwise")


def resolve(impl: str, platform: str | None = None) -> str:
    """`impl`, with `auto` replaced by the implementation for `platform`, by default the platform the program is
    traced for: the enclosing `activation_sharding` mesh's devices (a TPU topology's on a CPU host under `aot`),
    else JAX's default backend."""
    if impl != "auto":
        return impl
    return AUTO.get(platform or trace_platform(), "einsum")


def resolve_blocks(block: int, length: int, platform: str | None = None) -> tuple[int, int | None]:
    """(block_q, block_k) of `blockwise_attention` for rows of `length` tokens: (block, block) for an explicit
    `runtime.attention_block`; with 0, by `platform` (default as in `resolve`). On CPU, rows of at most
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


def trace_platform() -> str:
    """The platform the program is traced for (see `resolve`)."""
    from starling_jax.parallel.sharding import active_mesh

    mesh = active_mesh()
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def visible(q_seg, k_seg):
    """The segment part of the rule, broadcasting q_seg against k_seg (see the module docstring).

    `% PREFIX_STRIDE` and `// PREFIX_STRIDE` as a mask and a shift (ids are >= 0): XLA fuses this into every
    consumer of the [.., q, k] mask and evaluates it per score element; integer division there made the CPU
    blockwise forward ~4x slower (BENCHMARKS.md, "Train step vs PyTorch")."""
    prefix = ((k_seg & (PREFIX_STRIDE - 1)) == 0) & ((k_seg >> PREFIX_BITS) == (q_seg >> PREFIX_BITS))
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


def take_rows(x, select):
    """x [N, L, ...] at the tokens select [N, Q] → [N, Q, ...]."""
    index = select.astype(jnp.int32).reshape(*select.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, index, axis=1)


def rows_mask(segment_ids, positions, select, sliding_window: int | None):
    """Boolean [N, 1, 1, Q, L]: the rule for the queries at tokens select [N, Q] (int) against every key."""
    keys = jnp.arange(segment_ids.shape[-1])
    ok = allowed(take_rows(segment_ids, select), segment_ids, take_rows(positions, select), positions,
                 select.astype(jnp.int32), keys, sliding_window)
    return ok[:, None, None]


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
        raise ConfigError(f"runtime.attention_impl=cudnn needs a GPU (this backend is {jax.default_backend()}); "
                          "use fused or einsum")
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        local_window_size=(sliding_window - 1, 0) if sliding_window else None, implementation=implementation)


# ------------------------------------------------------------------------------------------------ blockwise
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


PER_ROW = True  # see `_by_row`


def _by_row(fn, *arrays):
    """fn over each row of the leading axis in turn (`lax.map`) when PER_ROW, else once over the batch. Rows
    in turn let each row skip its own dead block pairs (`_live_blocks`); over a batch only the pairs dead in
    every row are skipped, and in a batch of packed rows that is almost none."""
    if not PER_ROW or arrays[0].shape[0] == 1:
        return fn(*arrays)
    one = lambda xs: jax.tree.map(lambda y: y[0], fn(*jax.tree.map(lambda x: x[None], xs)))  # noqa: E731
    return jax.lax.map(one, arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blockwise(q, k, v, seg, pos, window, block_q, block_k):
    return _blockwise_fwd(q, k, v, seg, pos, window, block_q, block_k)[0]


def _blockwise_fwd(q, k, v, seg, pos, window, block_q, block_k):
    if block_k is None:
        masks = _strip_masks(seg, pos, block_q, window, q.shape[2] // k.shape[2])
        out, lse = _by_row(lambda *a: _strip_forward(*a, block_q), q, k, v, masks)
    else:
        out, lse = _by_row(lambda *a: _blockwise_forward(*a, window, block_q, block_k), q, k, v, seg, pos)
    return out, (q, k, v, seg, pos, out, lse)


def _blockwise_bwd(window, block_q, block_k, res, d_out):
    q, k, v, seg, pos, out, lse = res
    if block_k is None:
        masks = _strip_masks(seg, pos, block_q, window, q.shape[2] // k.shape[2])
        grads = _by_row(lambda *a: _strip_backward(*a, block_q), q, k, v, masks, out, lse, d_out)
    else:
        grads = _by_row(lambda *a: _blockwise_backward(*a, window, block_q, block_k), *res, d_out)
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
                acc, jax.lax.dynamic_slice_in_dim(acc, start, block_k, 2) + x, start, 2)
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
        [_strip_mask(seg, pos, i, block_q, window, r)[..., :(i + 1) * block_q] for i in range(nq)])


def _strip_forward(q, k, v, masks, block_q):
    """→ out [N, G, L·R, Dh] (q dtype), lse f32 [N, G, L·R] (0 on rows that see nothing); as `_blockwise_forward`,
    with `_strip_masks`."""
    n, g, rows, dh, r, nq, _, bqr, scale = _block_dims(q, k, block_q, block_q)
    outs, lses = [], []
    for i, mask in enumerate(masks):
        keys = (i + 1) * block_q
        s = jnp.where(mask, _dot(q[:, :, i * bqr:(i + 1) * bqr], k[:, :, :keys], "last") * scale, _NEG)
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


def blockwise_attention(q, k, v, segment_ids, positions, sliding_window: int | None = None,
                        block_q: int = 128, block_k: int | None = 128):
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
    out = _blockwise(qt, kt, vt, segment_ids.astype(jnp.int32), positions.astype(jnp.int32), sliding_window,
                     block_q, block_k)
    out = jnp.moveaxis(out.reshape(n, g, padded, h // g, dh), 2, 1).reshape(n, padded, h, dh)
    return out[:, :length]


# ------------------------------------------------------------------------------------------------ splash
def _splash_kernel(heads: int, length: int, sliding_window: int | None, block: int, interpret: bool,
                   save_residuals: bool = False):
    """The splash kernel for one example ([heads, length, Dh]): causal (+ local window, in indices) static mask,
    equal blocks for the forward and both backward passes."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    shape = (length, length)
    one = sm.LocalMask(shape, (sliding_window - 1, 0), 0) if sliding_window else sm.CausalMask(shape)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret, save_residuals=save_residuals)


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
    collapse = lambda info: info if info is None or info.partial_mask_blocks is None else info._replace(  # noqa: E731
        partial_mask_blocks=info.partial_mask_blocks.reshape(-1, *info.partial_mask_blocks.shape[-2:]))
    grads = None
    for ids in _prefix_passes(seg):
        residuals = (q, k, v, ids, None, out, lse, collapse(kernel.dq_mask_info), collapse(kernel.dkv_mask_info))
        _, _, _, dq, dk, dv, _, _ = sk._splash_attention_bwd(
            False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None, kw["mask_function"],
            kw["attn_logits_soft_cap"], interpret, residuals, d_out)
        grads = (dq, dk, dv) if grads is None else tuple(a + b for a, b in zip(grads, (dq, dk, dv)))
    return (*grads, None)


_splash_prefix.defvjp(_splash_prefix_fwd, _splash_prefix_bwd)


def splash_attention(q, k, v, segment_ids, sliding_window: int | None = None, mesh=None, block: int = 128,
                     interpret: bool = False):
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
                q, k, v, seg)

        def prefix(q, k, v, seg):
            if window_bites:
                return jnp.full(q.shape, jnp.nan, q.dtype)
            return jax.vmap(lambda q1, k1, v1, s1: _splash_prefix(q1, k1, v1, s1, sliding_window, block,
                                                                  interpret))(q, k, v, seg)

        out = jax.lax.cond(jnp.any(seg >= PREFIX_STRIDE), prefix, plain, q, k, v, seg)
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
    impl = resolve(cfg.attention_impl)
    if impl == "einsum":
        return attention_mask(segment_ids, positions, cfg.sliding_window)
    if impl in ("fused", "cudnn"):
        return jnp.sum(segment_ids != 0, axis=-1).astype(jnp.int32)
    return segment_ids, positions


def attend(cfg, q, k, v, context):
    """q [N, L, H, Dh], k/v [N, L, G, Dh] (after RoPE) → [N, L, H, Dh] with `cfg.attention_impl`."""
    impl = resolve(cfg.attention_impl)
    if impl == "einsum":
        return einsum_attention(q, k, v, context)
    if impl in ("fused", "cudnn"):
        return fused_attention(q, k, v, context, cfg.sliding_window, "cudnn" if impl == "cudnn" else None)
    segment_ids, positions = context
    if impl == "blockwise":
        blocks = resolve_blocks(cfg.attention_block, q.shape[1])
        return blockwise_attention(q, k, v, segment_ids, positions, cfg.sliding_window, *blocks)
    if impl == "splash":
        from starling_jax.parallel.sharding import active_mesh

        return splash_attention(q, k, v, segment_ids, cfg.sliding_window, mesh=active_mesh())
    raise ConfigError(f"runtime.attention_impl={impl!r}: choose one of {list(IMPLS)}")
