"""Ranking metrics of a reward model, host-side numpy, accumulated over an eval pass.

Inputs per batch (numpy or anything ``np.asarray`` takes; the K-wise batch of ARCHITECTURE.md):
``rewards`` float [B, K], ``ranks`` float [B, K] (1 = best, ties equal), ``answer_mask`` bool [B, K],
``answer_lengths`` int [B, K]. Masked answers (and all-masked padding rows) are ignored entirely, whatever
values they hold. Answer order along K does not matter.

``compute()`` returns a JSON-serializable dict (python floats/ints, string keys):

* ``pairwise_accuracy``: over all pairs of unmasked answers of a prompt with different ranks, pooled over
  prompts: 1 if the better-ranked answer has the higher reward, 0.5 on a reward tie, 0 otherwise.
* ``top1_accuracy``: over prompts with ≥ 2 answers whose ranks are not all equal: 1 if the highest-reward
  answer has the best rank (a tie for the best rank counts as correct for any of them). A tie for the highest
  reward gets the fraction of the tied answers that have the best rank (= expected value with random
  tie-breaking), so the result does not depend on answer order.
* ``kendall_tau``: mean over prompts of Kendall's τ-b between rewards and −ranks (so +1 = the rewards order the
  answers exactly as the ranks do). A prompt whose rewards are all tied scores 0 (τ-b is 0/0 there; a collapsed
  model that gives every answer the same reward must score 0, not drop out of the mean); prompts with < 2
  answers or all ranks tied (nothing to order) are skipped; ``num_kendall_prompts`` counts the others.
* ``mean_reward_by_rank``: {"1": mean reward of rank-1 answers, "2": ..., ...}, keys in increasing rank order
  (integral ranks print as integers; others as e.g. "1.5").
* ``reward_length_correlation``: Pearson correlation between reward and answer length, pooled over answers.
* ``reward_mean``, ``reward_std`` (population std, ddof=0), pooled over answers.
* ``num_prompts`` (prompts with ≥ 1 unmasked answer), ``num_answers``, ``num_pairs`` (the pairs of
  ``pairwise_accuracy``), ``num_top1_prompts``, ``num_kendall_prompts``.

A metric with nothing to average over (e.g. no pairs, zero length variance) is ``None`` (JSON null), never
NaN; callers logging scalars should skip ``None`` values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["RankingMetrics", "ranking_metrics"]


def _rank_key(rank: float) -> str:
    rank = float(rank)
    return str(int(rank)) if rank.is_integer() else repr(rank)


def _kendall_tau_b(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise Kendall τ-b of x vs y over unmasked entries, 0 where all x are tied. Returns (tau [B], defined [B]):
    defined where some pair is not tied in y."""
    k = x.shape[1]
    upper = np.triu(np.ones((k, k), dtype=bool), 1)
    pairs = mask[:, :, None] & mask[:, None, :] & upper  # each unordered pair once
    sx = np.sign(x[:, :, None] - x[:, None, :])
    sy = np.sign(y[:, :, None] - y[:, None, :])
    s = np.sum(np.where(pairs, sx * sy, 0.0), axis=(1, 2))  # concordant − discordant
    nx = np.sum(pairs & (sx != 0), axis=(1, 2))  # pairs not tied in x
    ny = np.sum(pairs & (sy != 0), axis=(1, 2))  # pairs not tied in y
    defined = ny > 0
    tau = np.where(defined & (nx > 0), s / np.sqrt(np.maximum(nx * ny, 1).astype(np.float64)), 0.0)
    return tau, defined


class RankingMetrics:
    """Accumulates ranking metrics over batches: ``update(...)`` per batch, ``compute()`` at the end."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._pair_correct = 0.0
        self._num_pairs = 0
        self._top1_correct = 0.0
        self._num_top1 = 0
        self._tau_sum = 0.0
        self._num_tau = 0
        self._num_prompts = 0
        self._rank_sum: dict[float, float] = {}
        self._rank_count: dict[float, int] = {}
        # Pooled moments of (reward, length), merged batch by batch (Chan et al.) for numerical stability.
        self._n = 0
        self._mean_r = 0.0
        self._mean_l = 0.0
        self._m2_r = 0.0
        self._m2_l = 0.0
        self._c_rl = 0.0

    def update(self, rewards: Any, ranks: Any, answer_mask: Any, answer_lengths: Any) -> "RankingMetrics":
        """Add one batch of [B, K] arrays. Returns self."""
        mask = np.asarray(answer_mask).astype(bool)
        shape = mask.shape
        arrays = [np.asarray(a) for a in (rewards, ranks, answer_lengths)]
        if mask.ndim != 2 or any(a.shape != shape for a in arrays):
            raise ValueError(
                "rewards, ranks, answer_mask and answer_lengths must all have shape [B, K]; got "
                f"{arrays[0].shape}, {arrays[1].shape}, {shape}, {arrays[2].shape}"
            )
        r = np.where(mask, arrays[0].astype(np.float64), 0.0)
        rk = np.where(mask, arrays[1].astype(np.float64), 0.0)
        ln = np.where(mask, arrays[2].astype(np.float64), 0.0)
        n_ans = mask.sum(axis=1)
        self._num_prompts += int(np.sum(n_ans > 0))

        # Pairwise accuracy: ordered pairs (j better than k).
        better = mask[:, :, None] & mask[:, None, :] & (rk[:, :, None] < rk[:, None, :])
        dr = r[:, :, None] - r[:, None, :]
        score = np.where(dr > 0, 1.0, np.where(dr == 0, 0.5, 0.0))
        self._pair_correct += float(np.sum(np.where(better, score, 0.0)))
        self._num_pairs += int(np.sum(better))

        # Top-1 accuracy (fractional credit on a tie for the highest reward).
        big = np.finfo(np.float64).max
        best_rank = np.min(np.where(mask, rk, big), axis=1, keepdims=True)
        worst_rank = np.max(np.where(mask, rk, -big), axis=1, keepdims=True)
        max_r = np.max(np.where(mask, r, -np.inf), axis=1, keepdims=True)
        is_max = mask & (r == max_r)
        has_best = is_max & (rk == best_rank)
        top1_rows = (n_ans >= 2) & (best_rank[:, 0] < worst_rank[:, 0])
        frac = has_best.sum(axis=1) / np.maximum(is_max.sum(axis=1), 1)
        self._top1_correct += float(np.sum(np.where(top1_rows, frac, 0.0)))
        self._num_top1 += int(np.sum(top1_rows))

        # Kendall τ-b between rewards and −ranks, per prompt.
        tau, defined = _kendall_tau_b(r, -rk, mask)
        self._tau_sum += float(np.sum(tau[defined]))
        self._num_tau += int(np.sum(defined))

        # Mean reward by rank.
        for rank in np.unique(rk[mask]):
            sel = mask & (rk == rank)
            key = float(rank)
            self._rank_sum[key] = self._rank_sum.get(key, 0.0) + float(np.sum(r[sel]))
            self._rank_count[key] = self._rank_count.get(key, 0) + int(np.sum(sel))

        # Pooled moments.
        rv, lv = r[mask], ln[mask]
        nb = rv.size
        if nb:
            mr, ml = float(rv.mean()), float(lv.mean())
            m2r = float(np.sum((rv - mr) ** 2))
            m2l = float(np.sum((lv - ml) ** 2))
            crl = float(np.sum((rv - mr) * (lv - ml)))
            n = self._n + nb
            dr_, dl_ = mr - self._mean_r, ml - self._mean_l
            w = self._n * nb / n
            self._m2_r += m2r + dr_ * dr_ * w
            self._m2_l += m2l + dl_ * dl_ * w
            self._c_rl += crl + dr_ * dl_ * w
            self._mean_r += dr_ * nb / n
            self._mean_l += dl_ * nb / n
            self._n = n
        return self

    def compute(self) -> dict[str, Any]:
        """The metrics so far, as a JSON-serializable dict (see the module docstring)."""

        def ratio(num: float, den: float) -> float | None:
            return float(num / den) if den > 0 else None

        corr = None
        if self._n > 0 and self._m2_r > 0 and self._m2_l > 0:
            corr = float(np.clip(self._c_rl / math.sqrt(self._m2_r * self._m2_l), -1.0, 1.0))
        return {
            "pairwise_accuracy": ratio(self._pair_correct, self._num_pairs),
            "top1_accuracy": ratio(self._top1_correct, self._num_top1),
            "kendall_tau": ratio(self._tau_sum, self._num_tau),
            "mean_reward_by_rank": {
                _rank_key(k): float(self._rank_sum[k] / self._rank_count[k]) for k in sorted(self._rank_sum)
            },
            "reward_length_correlation": corr,
            "reward_mean": float(self._mean_r) if self._n else None,
            "reward_std": float(math.sqrt(self._m2_r / self._n)) if self._n else None,
            "num_prompts": int(self._num_prompts),
            "num_answers": int(self._n),
            "num_pairs": int(self._num_pairs),
            "num_top1_prompts": int(self._num_top1),
            "num_kendall_prompts": int(self._num_tau),
        }


def ranking_metrics(rewards: Any, ranks: Any, answer_mask: Any, answer_lengths: Any) -> dict[str, Any]:
    """One-shot ``RankingMetrics().update(...).compute()`` for a single set of [B, K] arrays."""
    return RankingMetrics().update(rewards, ranks, answer_mask, answer_lengths).compute()
