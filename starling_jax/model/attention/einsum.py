"""`einsum`, the reference: the [N, H, L, L] scores in float32 under the rule's boolean mask, any layout, any
platform. Its `gqa_attention` is also the cached path (the sampler's KV cache, a few selected queries) of every
implementation that declares none."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from starling_jax.model.attention.registry import Implementation
from starling_jax.model.attention.rule import LAYOUTS, attention_mask


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
        qk = lambda k, hf: jnp.sum(
            q[:, 0, :, :, None, :].astype(jnp.float32) * heads_first(k, hf)[:, :, None].astype(jnp.float32), axis=-1
        )[:, :, :, None]
        pv = lambda p, v, hf: jnp.sum(p[:, :, :, 0, :, None] * heads_first(v, hf)[:, :, None], axis=3)[:, None]
    else:
        qk = lambda k, hf: jnp.einsum(
            "nqgrk,ngsk->ngrqs" if hf else "nqgrk,nsgk->ngrqs", q, k, preferred_element_type=jnp.float32
        )
        pv = lambda p, v, hf: jnp.einsum("ngrqs,ngsk->nqgrk" if hf else "ngrqs,nsgk->nqgrk", p, v)
    scores = [jnp.where(mask, qk(k, hf) / scale, jnp.finfo(jnp.float32).min) for k, _, mask, hf in blocks]
    sizes = [s.shape[-1] for s in scores]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0], axis=-1)
    probs = probs.astype(q.dtype)
    out, start = 0, 0
    for (_, v, _, hf), size in zip(blocks, sizes):
        out = out + pv(probs[..., start : start + size], v, hf)
        start += size
    return out.reshape(n, lq, h, dh)


def _prepare(cfg, segment_ids, positions):
    return attention_mask(segment_ids, positions, cfg.sliding_window)


def _attend(cfg, q, k, v, mask):
    return einsum_attention(q, k, v, mask)


def _attend_cached(cfg, q, blocks):
    return gqa_attention(q, blocks)


EINSUM = Implementation(
    name="einsum",
    layouts=frozenset(LAYOUTS),
    platforms=None,
    prepare=_prepare,
    attend=_attend,
    attend_cached=_attend_cached,
)
