"""Pure per-step decoding math on a batch of next-token logits [N, V] (jit-friendly, no sorting).

Order of the warpers (as transformers' `generate`): temperature → top-k → top-p, then a draw from the remaining
distribution.

- temperature T > 0: logits / T (`T = 0` means greedy and is handled by the caller with an argmax).
- top-k: keep the tokens whose logit is ≥ the k-th largest (ties with the k-th are kept together).
- top-p (nucleus, HF's rule): with p the probabilities after the steps above, keep token i iff the mass of the
  tokens strictly more probable than it is < top_p, i.e. M(p_i) < top_p with M(t) = Σ_{p_j > t} p_j. M is
  non-increasing, so the kept set is {i : p_i ≥ τ} with τ the smallest float t such that M(t) < top_p. τ is found
  exactly by bisection over the bit patterns of non-negative float32 numbers (which order like the floats),
  from the bracket [(1 - top_p) / 2V, max p] until no probability is left inside it (≤ 31 masked sums over the
  vocabulary instead of a sort: a [16, 32000] sort takes ~230 ms on the 2-core CPU, the bisection ~5-9 ms). The
  most probable token is always kept.
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
    to_bits = lambda x: jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)
    # Invariant: M(to_float(hi)) < top_p (hi starts at the max probability, where M = 0) and M(t) ≥ top_p for
    # every t below to_float(lo). Start: since Σ_{p_j ≤ t} p_j ≤ V·t, M(t) ≥ 1 - V·t > top_p for every
    # t < (1 - top_p) / (2V), a bracket ~4 binades narrower than [0, max].
    lo = jnp.broadcast_to(to_bits((1.0 - top_p) / (2 * probs.shape[-1])), probs.shape[:-1])
    hi = to_bits(jnp.max(probs, axis=-1))
    lo = jnp.minimum(lo, hi)

    # The vocabulary in blocks of BLOCK (zero-padded once: a zero is never above a threshold nor inside the
    # bracket, whose low end is > 0): sums of blocks, then of their sums, keep the float error of the mass small.
    blocks = _blocks(probs)

    def open_counts(lo, mid, hi):
        """Per row, in one pass over the vocabulary: the mass strictly above `mid`, and whether any probability
        lies in [lo, mid) and in [mid, hi) (counted per block in one int32 as low + 2^16 · high: ≤ BLOCK each)."""
        p_lo, p_mid, p_hi = (to_float(b)[:, None, None] for b in (lo, mid, hi))
        low = (blocks >= p_lo) & (blocks < p_mid)
        high = (blocks >= p_mid) & (blocks < p_hi)
        mass_above, packed = jax.lax.reduce(  # one variadic reduction: one pass over the probabilities
            (jnp.where(blocks > p_mid, blocks, 0.0), low.astype(jnp.int32) + (high.astype(jnp.int32) << 16)),
            (jnp.float32(0), jnp.int32(0)),
            lambda a, b: (a[0] + b[0], a[1] + b[1]),
            (2,),
        )
        return (
            jnp.sum(mass_above, axis=-1),
            jnp.any((packed & 0xFFFF) > 0, axis=-1),
            jnp.any((packed >> 16) > 0, axis=-1),
        )

    def unresolved(state):
        return jnp.any(state[2])

    def halve(state):
        # Done when lo == hi, or when no probability lies in [lo, hi): every threshold in it keeps the same set.
        # The counts for both halves come from the same pass as the mass, so the loop's test reads a flag; the
        # count for [mid, hi) stands in for [mid + 1, hi) (a superset: at worst one more halving, same result).
        lo, hi, _ = state
        mid = lo + (hi - lo) // 2
        mass_above, in_low, in_high = open_counts(lo, mid, hi)
        ok = mass_above < top_p
        lo, hi = jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)
        return lo, hi, (lo < hi) & jnp.where(ok, in_low, in_high)

    start_open = (lo < hi) & jnp.any((probs >= to_float(lo)[..., None]) & (probs < to_float(hi)[..., None]), axis=-1)
    _, hi, _ = jax.lax.while_loop(unresolved, halve, (lo, hi, start_open))
    return probs >= to_float(hi)[..., None]


def warp(logits, temperature: float, top_k: int, top_p: float):
    """Sampling log-probabilities [N, V] (float32): temperature, then top-k, then top-p; removed tokens get -inf."""
    logits = logits.astype(jnp.float32) / temperature
    logits = jnp.where(top_k_mask(logits, top_k), logits, -jnp.inf)
    if top_p < 1.0:
        logits = jnp.where(top_p_mask(jax.nn.softmax(logits, axis=-1), top_p), logits, -jnp.inf)
    return jax.nn.log_softmax(logits, axis=-1)


def _pick(x, tokens):
    return jnp.take_along_axis(x, tokens[:, None], axis=1)[:, 0]


def _blocks(x):
    """[N, V] → [N, ceil(V / BLOCK), BLOCK] float32, zero-padded at the end."""
    n, v = x.shape
    nb = -(-v // BLOCK)
    return jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * BLOCK - v))).reshape(n, nb, BLOCK)


def inverse_cdf(probs, u):
    """Index [N] of the first token whose cumulative probability exceeds u · Σ probs (u [N] in [0, 1)).

    Two levels: block sums locate the block, a cumulative sum inside that block locates the token. A token of
    probability 0 is never returned (when rounding leaves no cumulative value above the target, the block's last
    token of positive probability is taken)."""
    blocks = _blocks(probs)
    nb = blocks.shape[1]
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
    distribution, what PPO/APA need), log-prob under the sampling distribution [N] (0 for greedy)).

    Same math as `warp` + a draw, arranged for speed on a [N, 32000] vocabulary: one exp pass (the softmax at T,
    reused by top-p, the draw and both log-probs when T = 1), log-probs read at the chosen tokens only (a
    logsumexp, never a [N, V] log-softmax)."""
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        raw_lp = _pick(logits, tokens) - jax.nn.logsumexp(logits, axis=-1)
        return tokens, raw_lp, jnp.zeros(tokens.shape, jnp.float32)
    z = logits / temperature
    keep = top_k_mask(z, top_k)
    z = jnp.where(keep, z, -jnp.inf)
    z_max = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.exp(z - z_max)  # 0 outside the top-k
    log_total = jnp.log(jnp.sum(e, axis=-1))
    if top_p < 1.0:
        e = jnp.where(top_p_mask(e / jnp.exp(log_total)[:, None], top_p), e, 0.0)
    tokens = inverse_cdf(e, row_uniforms(key, row_ids, step))
    z_tok = _pick(z, tokens) - z_max[:, 0]
    sampling_lp = z_tok - (jnp.log(jnp.sum(e, axis=-1)) if top_p < 1.0 else log_total)
    if temperature == 1.0 and top_k <= 0:  # z is the raw logits: reuse the normalizer
        raw_lp = z_tok - log_total
    else:
        raw_lp = _pick(logits, tokens) - jax.nn.logsumexp(logits, axis=-1)
    return tokens, raw_lp, sampling_lp
