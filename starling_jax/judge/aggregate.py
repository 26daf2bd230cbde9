"""Aggregating the rankings of several orders into one, ranks with ties, and Kendall τ.

Aggregation is a Borda count: under each order the answer the judge put at position p (0 = best) of K gets
K − 1 − p points; an answer's score is its mean over the orders, and its rank is 1 + the number of answers with a
strictly higher score (ties stay ties: equal scores get the same, best, rank — Nectar's ranks with ties). Borda is
the maximum-likelihood ranking of no model in particular, but it is exact on what matters here: a purely positional
bias of the judge adds the same points to every answer when the orders place each answer at each position equally
often (`prompt.orders_for_row` does so for N ≤ K orders), so it cancels.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from starling_jax.eval.metrics import _kendall_tau_b


def borda_scores(rankings: Sequence[Sequence[int]], k: int) -> np.ndarray:
    """rankings: each a best-first list of answer indices (a permutation of 0..k-1) → mean Borda points [k]."""
    points = np.zeros(k, np.float64)
    for ranking in rankings:
        if sorted(ranking) != list(range(k)):
            raise ValueError(f"not a permutation of 0..{k - 1}: {list(ranking)}")
        for position, answer in enumerate(ranking):
            points[answer] += k - 1 - position
    return points / max(len(rankings), 1)


def ranks_from_scores(scores: Sequence[float]) -> list[int]:
    """Higher score = better: rank = 1 + #answers with a strictly higher score (equal scores share the rank)."""
    s = np.asarray(scores, np.float64)
    return [int(1 + np.sum(s > x)) for x in s]


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall τ-b between two score vectors (higher = better in both); 0 where either is all ties."""
    x = np.asarray(x, np.float64)[None]
    y = np.asarray(y, np.float64)[None]
    tau, _ = _kendall_tau_b(x, y, np.ones_like(x, bool))
    return float(tau[0])


def ranking_scores(ranking: Sequence[int]) -> np.ndarray:
    """A best-first permutation → scores (K − 1 − position per answer)."""
    return borda_scores([ranking], len(ranking))


def agreement(rankings: Sequence[Sequence[int]]) -> float | None:
    """Mean Kendall τ between the rankings of every pair of orders (1 = all orders gave the same ranking); None
    for one order."""
    if len(rankings) < 2:
        return None
    taus = [kendall_tau(ranking_scores(a), ranking_scores(b)) for a, b in itertools.combinations(rankings, 2)]
    return float(np.mean(taus))
