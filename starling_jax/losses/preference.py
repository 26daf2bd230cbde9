"""Direct preference losses over K-wise rankings (DPO family; pure functions of arrays, jit-compatible).

Inputs, per prompt b and answer slot k (the K-wise batch of ARCHITECTURE.md):

* ``policy_logps``     float [B, K]  log π(y_k | x): the policy's log-probabilities summed over the answer's tokens
* ``reference_logps``  float [B, K]  log π_ref(y_k | x), the same sum under the frozen reference
* ``ranks``            float [B, K]  Nectar rank, 1 = best, ties equal
* ``answer_mask``      bool  [B, K]  False for missing answers and padding rows
* ``beta``             float         β, the strength of the implicit KL regularization

The implied reward of an answer is

    r_k = β · (log π(y_k | x) − log π_ref(y_k | x))

Each loss returns ``(loss, aux)`` like `losses/ranking.py`: ``loss`` the mean over the prompts that count,
``aux["per_prompt_loss"]`` [B] and ``aux["num_valid_prompts"]`` (for micro-batch re-weighting), 0 (never NaN)
when no prompt counts. Masked answers never reach the value or the gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from starling_jax.losses.ranking import _masked_mean, _prepare, plackett_luce_loss

__all__ = ["PAIRS", "PREFERENCE_LOSSES", "implied_rewards", "ipo_loss", "kwise_dpo_loss", "pairwise_dpo_loss"]

Array = jax.Array
PAIRS = ("all", "best_vs_rest")


def implied_rewards(policy_logps: Array, reference_logps: Array, beta: float) -> Array:
    """r = β · (log π − log π_ref), elementwise (float32 at least)."""
    dtype = jnp.promote_types(jnp.asarray(policy_logps).dtype, jnp.float32)
    return jnp.asarray(beta, dtype) * (jnp.asarray(policy_logps, dtype) - jnp.asarray(reference_logps, dtype))


def kwise_dpo_loss(
    policy_logps: Array, reference_logps: Array, ranks: Array, answer_mask: Array, *, beta: float
) -> tuple[Array, dict[str, Array]]:
    r"""K-wise DPO: the Plackett-Luce negative log-likelihood of the whole ranking over the implied rewards
    (Rafailov et al. 2023, appendix A.3), ties as in the reward model's loss (Breslow):

        L = − Σ_{j unmasked} [ r_j − log Σ_{k unmasked, rank_k ≥ rank_j} exp(r_k) ],   r = β (log π − log π_ref)

    i.e. `ranking.plackett_luce_loss` applied to the implied rewards. With K = 2 and no tie it is sigmoid DPO,
    −log σ(r_chosen − r_rejected). Prompts with fewer than 2 answers do not count.
    """
    return plackett_luce_loss(implied_rewards(policy_logps, reference_logps, beta), ranks, answer_mask)


def _ordered_pairs(ranks, mask, pairs: str):
    """[B, j, k]: answer j is strictly better than k (and, for best_vs_rest, j holds the prompt's best rank)."""
    better = mask[:, :, None] & mask[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
    if pairs == "best_vs_rest":
        best = jnp.min(jnp.where(mask, ranks, jnp.inf), axis=-1)
        better = better & (ranks == best[:, None])[:, :, None]
    elif pairs != "all":
        raise ValueError(f"pairs={pairs!r}: choose one of {list(PAIRS)}")
    return better


def _mean_over_pairs(per_pair, better, dtype):
    zero = jnp.zeros((), dtype)
    n_pairs = jnp.sum(better.astype(dtype), axis=(1, 2))
    valid = n_pairs > 0
    per_prompt = jnp.where(
        valid, jnp.sum(jnp.where(better, per_pair, zero), axis=(1, 2)) / jnp.maximum(n_pairs, 1), zero
    )
    loss, n = _masked_mean(per_prompt, valid, dtype)
    return loss, {"per_prompt_loss": per_prompt, "num_valid_prompts": n, "num_pairs": n_pairs}


def pairwise_dpo_loss(
    policy_logps: Array,
    reference_logps: Array,
    ranks: Array,
    answer_mask: Array,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    pairs: str = "all",
) -> tuple[Array, dict[str, Array]]:
    r"""Sigmoid DPO over the ordered pairs of each ranking, with label smoothing (conservative DPO; trl's
    `sigmoid` loss with `label_smoothing`). For every pair (j, k) with rank_j < rank_k (tied pairs dropped;
    ``pairs="best_vs_rest"``: only j of the prompt's best rank):

        h_jk = (log π(y_j) − log π_ref(y_j)) − (log π(y_k) − log π_ref(y_k))
        ℓ_jk = −(1 − ε) log σ(β h_jk) − ε log σ(−β h_jk),      ε = label_smoothing

    L = mean over a prompt's pairs, then over prompts with at least one pair. ε = 0 is sigmoid DPO.
    """
    _, rk, mask, dtype = _prepare(policy_logps, ranks, answer_mask)
    logratio = jnp.where(mask, implied_rewards(policy_logps, reference_logps, 1.0).astype(dtype), 0.0)
    better = _ordered_pairs(rk, mask, pairs)
    h = jnp.where(better, logratio[:, :, None] - logratio[:, None, :], 0.0)
    eps = jnp.asarray(label_smoothing, dtype)
    bh = jnp.asarray(beta, dtype) * h
    per_pair = (1 - eps) * jax.nn.softplus(-bh) + eps * jax.nn.softplus(bh)  # −log σ(x) = softplus(−x)
    return _mean_over_pairs(per_pair, better, dtype)


def ipo_loss(
    policy_logps: Array,
    reference_logps: Array,
    ranks: Array,
    answer_mask: Array,
    *,
    beta: float,
    completion_lengths: Array,
    pairs: str = "all",
) -> tuple[Array, dict[str, Array]]:
    r"""IPO (Azar et al. 2023, eq. 17) over the ordered pairs of each ranking, as trl's `ipo` computes it: the
    log-ratios are averaged over each answer's n tokens (``completion_lengths``), so that β is comparable across
    lengths. For every pair (j, k) with rank_j < rank_k:

        h_jk = (log π(y_j) − log π_ref(y_j)) / n_j − (log π(y_k) − log π_ref(y_k)) / n_k
        ℓ_jk = (h_jk − 1 / (2β))²

    L = mean over a prompt's pairs, then over prompts with at least one pair.
    """
    _, rk, mask, dtype = _prepare(policy_logps, ranks, answer_mask)
    n = jnp.maximum(jnp.where(mask, jnp.asarray(completion_lengths).astype(dtype), 1.0), 1.0)
    logratio = jnp.where(mask, implied_rewards(policy_logps, reference_logps, 1.0).astype(dtype) / n, 0.0)
    better = _ordered_pairs(rk, mask, pairs)
    h = jnp.where(better, logratio[:, :, None] - logratio[:, None, :], 0.0)
    per_pair = (h - 1.0 / (2.0 * jnp.asarray(beta, dtype))) ** 2
    return _mean_over_pairs(per_pair, better, dtype)


PREFERENCE_LOSSES: dict[str, Callable[..., tuple[Array, dict[str, Array]]]] = {
    "kwise": kwise_dpo_loss,
    "pairwise": pairwise_dpo_loss,
    "ipo": ipo_loss,
}
