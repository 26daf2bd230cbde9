"""Pure per-step decoding math on a batch of next-token logits [N, V] (jit-friendly, no sorting).

Order of the warpers (as transformers' `generate`): temperature → top-k → top-p, then a draw from the remaining
distribution.

- temperature T > 0: logits / T (`T = 0` means greedy and is handled by the caller with an argmax).
- top-k: keep the tokens whose logit is ≥ the k-th largest (ties with the k-th are kept together).
- top-p (nucleus, HF's rule): with p the probabilities after the steps above, keep token i iff the mass of the
  tokens strictly more probable than it is < top_p, i.e. M(p_i) < top_p with M(t) = Σ_{p_j > t} p_j. M is
  non-increasing, so the kept set is {i : p_i ≥ τ} with τ the smallest float t such that M(t) < top_p. τ is found
  exactly by bisection over the bit patterns of non-negative float32 numbers (which order like the floats) —
  31 masked sums over the vocabulary instead of a sort (a [16, 32000] sort takes ~230 ms on the 2-core CPU, the
  bisection ~9 ms). The most probable token is always kept.
- the draw: inverse CDF with one uniform u per row — the first token whose cumulative probability exceeds
  u · total, found in two levels (sums of 128-token blocks, then a cumulative sum inside one block), so no
  [N, V] cumulative sum and no V Gumbel draws per row (each costs several ms per step on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 128  # tokens per block of the two-level inverse CDF


def top_k_mask(logits, k: int):
    """Boolean [N, V]: the tokens kept by top-k (logit ≥ the k-th largest). k ≤ 0 or ≥ V keeps everything."""
    if k <= 0 or k >= logits.shape[-1]:
        return jnp.ones(logits.shape, bool)
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    return logits >= kth


def top_p_mask(probs, top_p: float):
    """Boolean [N, V]: the nucleus {i : Σ_{p_j > p_i} p_j < top_p} of each row of `probs` (see module doc)."""
    if top_p >= 1.0:
        return jnp.ones(probs.shape, bool)
    probs = probs.astype(jnp.float32)
    to_float = lambda bits: jax.lax.bitcast_convert_type(bits, jnp.float32)
    # Invariant: M(to_float(hi)) < top_p (hi starts at the max probability, where M = 0) and M(t) ≥ top_p for
    # every t below to_float(lo). Halving [lo, hi] 31 times pins hi to the smallest such t.
    lo = jnp.zeros(probs.shape[:-1], jnp.int32)
    hi = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1), jnp.int32)

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        mass_above = jnp.sum(jnp.where(probs > to_float(mid)[..., None], probs, 0.0), axis=-1)
        ok = mass_above < top_p
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    _, hi = jax.lax.fori_loop(0, 31, body, (lo, hi))
    return probs >= to_float(hi)[..., None]


def warp(logits, temperature: float, top_k: int, top_p: float):
    """Sampling log-probabilities [N, V] (float32): temperature, then top-k, then top-p; removed tokens get -inf."""
    logits = logits.astype(jnp.float32) / temperature
    logits = jnp.where(top_k_mask(logits, top_k), logits, -jnp.inf)
    if top_p < 1.0:
        logits = jnp.where(top_p_mask(jax.nn.softmax(logits, axis=-1), top_p), logits, -jnp.inf)
    return jax.nn.log_softmax(logits, axis=-1)


def inverse_cdf(probs, u):
    """Index [N] of the first token whose cumulative probability exceeds u · Σ probs (u [N] in [0, 1)).

    Two levels: block sums locate the block, a cumulative sum inside that block locates the token. A token of
    probability 0 is never returned (when rounding leaves no cumulative value above the target, the block's last
    token of positive probability is taken)."""
    n, v = probs.shape
    nb = -(-v // BLOCK)
    blocks = jnp.pad(probs.astype(jnp.float32), ((0, 0), (0, nb * BLOCK - v))).reshape(n, nb, BLOCK)
    cum_blocks = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)  # [N, nb]
    target = u * cum_blocks[:, -1]
    b = jnp.minimum(jnp.sum(cum_blocks <= target[:, None], axis=-1), nb - 1)  # first block with cum > target
    before = jnp.where(b > 0, jnp.take_along_axis(cum_blocks, jnp.maximum(b - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    within = jnp.take_along_axis(blocks, b[:, None, None], axis=1)[:, 0]  # [N, BLOCK]
    above = (before[:, None] + jnp.cumsum(within, axis=-1)) > target[:, None]
    ar = jnp.arange(BLOCK)
    first = jnp.min(jnp.where(above & (within > 0), ar, BLOCK), axis=-1)
    last_positive = jnp.max(jnp.where(within > 0, ar, -1), axis=-1)
    j = jnp.where(first < BLOCK, first, jnp.maximum(last_positive, 0))
    return (b * BLOCK + j).astype(jnp.int32)


def row_uniforms(key, row_ids, step):
    """One uniform in [0, 1) per row, from the key folded with the row id and the step: a row's draws do not
    depend on which rows share its batch."""
    return jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, r), step)))(row_ids)


def choose(logits, key, row_ids, step, temperature: float, top_k: int, top_p: float):
    """Next tokens of a batch → (tokens [N] int32, raw log-prob [N] at temperature 1 (the model's own
    distribution, what PPO/APA need), log-prob under the sampling distribution [N] (0 for greedy))."""
    raw = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if temperature == 0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        sampling_lp = jnp.zeros(tokens.shape, jnp.float32)
    else:
        warped = warp(logits, temperature, top_k, top_p)
        tokens = inverse_cdf(jnp.exp(warped), row_uniforms(key, row_ids, step))
        sampling_lp = jnp.take_along_axis(warped, tokens[:, None], axis=1)[:, 0]
    return tokens, jnp.take_along_axis(raw, tokens[:, None], axis=1)[:, 0], sampling_lp
