"""Ranking losses for K-wise reward-model training (pure functions of arrays, jit-compatible).

All losses take the K-wise batch arrays of ARCHITECTURE.md:

* ``rewards``     float [B, K]  scalar reward of each answer (any float dtype; computed in at least float32)
* ``ranks``       float [B, K]  Nectar rank, 1 = best, lower is better, ties have equal ranks
* ``answer_mask`` bool  [B, K]  False for missing answers and padding rows

Answer order along K does not matter: everything is defined through rank comparisons between answers, so
permuting answers (together with their ranks and mask) leaves every loss unchanged. Masked answers are
excluded entirely: their reward and rank values (finite garbage or NaN/inf) never reach the loss value or
its gradient (the gradient w.r.t. a masked reward is exactly 0).

Computation dtype is ``promote_types(rewards.dtype, float32)``: bfloat16/float16 rewards are upcast to float32;
float64 stays float64 (only used by tests under ``jax.enable_x64``).

Each ranking loss returns ``(loss, aux)`` where ``loss`` is a scalar and ``aux`` a dict of arrays:

* ``per_prompt_loss`` [B]: the loss of each prompt (0 for prompts that do not count),
* ``num_valid_prompts`` scalar float: how many prompts count in the mean (so callers can re-weight means
  across micro-batches / devices: ``sum(loss_i * n_i) / sum(n_i)``).

If no prompt in the batch counts, ``loss`` is 0 (with zero gradient), never NaN.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

from starling_jax.errors import ConfigError

__all__ = [
    "plackett_luce_loss",
    "pairwise_loss",
    "reward_centering_loss",
    "RANKING_LOSSES",
    "get_ranking_loss",
    "ranking_loss",
]

Array = jax.Array


def _prepare(rewards, ranks, answer_mask):
    """Cast, check shapes and zero out masked slots (so NaN/inf garbage cannot leak into values or grads)."""
    rewards = jnp.asarray(rewards)
    ranks = jnp.asarray(ranks)
    mask = jnp.asarray(answer_mask).astype(bool)
    if rewards.ndim != 2 or rewards.shape != ranks.shape or rewards.shape != mask.shape:
        raise ValueError(
            "rewards, ranks and answer_mask must all have shape [B, K]; got "
            f"{rewards.shape}, {ranks.shape}, {mask.shape}"
        )
    dtype = jnp.promote_types(rewards.dtype, jnp.float32)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    # jnp.where's gradient is a select, so masked slots get exactly zero gradient even if they hold NaN.
    r = jnp.where(mask, rewards.astype(dtype), jnp.zeros((), dtype))
    rk = jnp.where(mask, ranks.astype(dtype), jnp.zeros((), dtype))
    return r, rk, mask, dtype


def _masked_mean(per_prompt: Array, valid: Array, dtype) -> tuple[Array, Array]:
    n = jnp.sum(valid.astype(dtype))
    total = jnp.sum(jnp.where(valid, per_prompt, jnp.zeros((), dtype)))
    return total / jnp.maximum(n, jnp.ones((), dtype)), n


def plackett_luce_loss(rewards: Array, ranks: Array, answer_mask: Array) -> tuple[Array, dict[str, Array]]:
    r"""K-wise Plackett-Luce negative log-likelihood (Zhu et al. 2023, arXiv 2301.11270), Breslow ties.

    Shapes: ``rewards``, ``ranks``, ``answer_mask`` are [B, K]; returns a scalar loss and
    ``aux = {"per_prompt_loss": [B], "num_valid_prompts": []}``.

    With σ the best-first order of the unmasked answers of a prompt (from ``ranks``, 1 = best), the loss of
    the prompt is

        L = − Σ_j [ r_σ(j) − logsumexp_{k ≥ j} r_σ(k) ]

    i.e. −log P(σ) with P(σ) = Π_j exp(r_σ(j)) / Σ_{k≥j} exp(r_σ(k)); the last term is 0.

    Tie rule (Breslow): for an unmasked answer j the denominator holds every unmasked answer k with
    rank_k ≥ rank_j — its whole tie group (itself included) and everything ranked worse:

        L = − Σ_{j unmasked} [ r_j − log Σ_{k unmasked, rank_k ≥ rank_j} exp(r_k) ]

    Example: ranks (1, 2, 2, 3), rewards (a, b, c, d):
    L = −[a − lse(a,b,c,d)] − [b − lse(b,c,d)] − [c − lse(b,c,d)] − [d − lse(d)], the last term being 0.
    Without ties this is exactly the Plackett-Luce NLL of the rank order. (Implemented with a [B, K, K]
    "k is in j's denominator" matrix, which is the stable-sort + suffix-logsumexp formulation extended to
    tie groups; it is independent of the order of answers along K.)

    Prompts with fewer than 2 unmasked answers contribute 0 and are not counted; the loss is the mean over
    the other prompts (0 if none). Invariant to adding a constant to all rewards of a prompt. Numerically
    stable: logsumexp is max-shifted per denominator and masked slots are removed with selects, not with
    large negative constants.
    """
    r, rk, mask, dtype = _prepare(rewards, ranks, answer_mask)
    # in_denom[b, j, k]: answer k is in the denominator of answer j's term.
    pair_mask = mask[:, :, None] & mask[:, None, :]
    in_denom = pair_mask & (rk[:, None, :] >= rk[:, :, None])
    r_k = jnp.broadcast_to(r[:, None, :], in_denom.shape)
    zero = jnp.zeros((), dtype)
    # Max over each (non-empty for unmasked j, since j ∈ its own denominator) denominator set.
    m = jnp.max(jnp.where(in_denom, r_k, jnp.asarray(jnp.finfo(dtype).min, dtype)), axis=-1)
    m = jax.lax.stop_gradient(jnp.where(mask, m, zero))  # [B, K]
    shifted = jnp.where(in_denom, r_k - m[:, :, None], zero)  # double-where: no inf/NaN in either branch
    s = jnp.sum(jnp.where(in_denom, jnp.exp(shifted), zero), axis=-1)  # ≥ 1 for unmasked j
    lse = m + jnp.log(jnp.where(mask, s, jnp.ones((), dtype)))
    terms = jnp.where(mask, r - lse, zero)  # [B, K], each ≤ 0
    n_answers = jnp.sum(mask, axis=-1)
    valid = n_answers >= 2
    per_prompt = jnp.where(valid, -jnp.sum(terms, axis=-1), zero)
    loss, n = _masked_mean(per_prompt, valid, dtype)
    return loss, {"per_prompt_loss": per_prompt, "num_valid_prompts": n}


def pairwise_loss(
    rewards: Array, ranks: Array, answer_mask: Array, margin_scale: float = 0.0
) -> tuple[Array, dict[str, Array]]:
    r"""Bradley-Terry loss over all strictly ordered pairs of a prompt (InstructGPT-style K-wise split).

    Shapes: ``rewards``, ``ranks``, ``answer_mask`` are [B, K]; returns a scalar loss and
    ``aux = {"per_prompt_loss": [B], "num_valid_prompts": [], "num_pairs": [B]}``.

    Per prompt, over the P pairs (j, k) of unmasked answers with rank_j < rank_k (j strictly better; tied
    pairs are dropped):

        L = (1/P) Σ_{(j,k)} −log σ(r_j − r_k − m_jk),   m_jk = margin_scale · (rank_k − rank_j)

    (margin from the rank gap, Llama-2-style; 0 by default). Prompts with no valid pair contribute 0 and are
    not counted; the loss is the mean over the other prompts (0 if none).
    """
    r, rk, mask, dtype = _prepare(rewards, ranks, answer_mask)
    pair_mask = mask[:, :, None] & mask[:, None, :]
    better = pair_mask & (rk[:, :, None] < rk[:, None, :])  # [B, j, k]: j strictly better than k
    zero = jnp.zeros((), dtype)
    margin = jnp.asarray(margin_scale, dtype) * (rk[:, None, :] - rk[:, :, None])
    diff = jnp.where(better, r[:, :, None] - r[:, None, :] - margin, zero)
    nll = jnp.where(better, jax.nn.softplus(-diff), zero)  # −log σ(x) = softplus(−x)
    n_pairs = jnp.sum(better.astype(dtype), axis=(1, 2))
    valid = n_pairs > 0
    per_prompt = jnp.where(valid, jnp.sum(nll, axis=(1, 2)) / jnp.maximum(n_pairs, 1), zero)
    loss, n = _masked_mean(per_prompt, valid, dtype)
    return loss, {"per_prompt_loss": per_prompt, "num_valid_prompts": n, "num_pairs": n_pairs}


def reward_centering_loss(rewards: Array, answer_mask: Array) -> Array:
    r"""Reward-centering penalty (Eisenstein et al. 2023, "Helping or Herding"; OpenRLHF-style), a scalar.

    Shapes: ``rewards`` and ``answer_mask`` are [B, K]. Per prompt, the squared mean reward over its
    unmasked answers; averaged over prompts with at least one unmasked answer (0 if none):

        C = mean_b ( (1/n_b) Σ_{k unmasked} r_bk )²

    Add it to a ranking loss with a small coefficient to pin the (otherwise free) reward offset near 0.
    """
    rewards = jnp.asarray(rewards)
    mask = jnp.asarray(answer_mask).astype(bool)
    if rewards.ndim != 2 or rewards.shape != mask.shape:
        raise ValueError(f"rewards and answer_mask must have shape [B, K]; got {rewards.shape}, {mask.shape}")
    dtype = jnp.promote_types(rewards.dtype, jnp.float32)
    zero = jnp.zeros((), dtype)
    r = jnp.where(mask, rewards.astype(dtype), zero)
    n = jnp.sum(mask.astype(dtype), axis=-1)
    valid = n > 0
    mean = jnp.sum(r, axis=-1) / jnp.maximum(n, 1)
    loss, _ = _masked_mean(jnp.where(valid, mean * mean, zero), valid, dtype)
    return loss


RANKING_LOSSES: dict[str, Callable[..., tuple[Array, dict[str, Array]]]] = {
    "kwise": plackett_luce_loss,
    "pairwise": pairwise_loss,
}


def get_ranking_loss(name: str) -> Callable[..., tuple[Array, dict[str, Array]]]:
    """The ranking loss registered under ``name`` ("kwise" or "pairwise"); unknown names → ConfigError."""
    try:
        return RANKING_LOSSES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown ranking loss {name!r}; valid names: {', '.join(sorted(RANKING_LOSSES))}") from None


def ranking_loss(
    name: str, rewards: Array, ranks: Array, answer_mask: Array, **kwargs: Any
) -> tuple[Array, dict[str, Array]]:
    """Call the ranking loss ``name`` with ``(rewards, ranks, answer_mask, **kwargs)``.

    Unknown names, and options the selected loss does not take (e.g. ``margin_scale`` for "kwise"), raise
    ConfigError.
    """
    fn = get_ranking_loss(name)
    params = inspect.signature(fn).parameters
    extra = sorted(set(kwargs) - set(list(params)[3:]))
    if extra:
        allowed = ", ".join(list(params)[3:]) or "none"
        raise ConfigError(f"ranking loss {name!r} does not take option(s) {', '.join(extra)}; it takes: {allowed}")
    return fn(rewards, ranks, answer_mask, **kwargs)
