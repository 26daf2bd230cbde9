"""Win rate against reference answers and the length-controlled win rate of AlpacaEval 2.

A preference is in [0, 1]: 1 when the judge prefers the model's answer to the reference answer, 0 when it prefers
the reference, 0.5 for a tie (AlpacaEval maps its 1/2/0 preferences the same way). The win rate is their mean, in
percent.

Length-controlled win rate (Dubois et al. 2024, "Length-Controlled AlpacaEval", alpaca_eval
`metrics/glm_winrate.py`, GLM `length_controlled_minimal`: `np.tanh(std_delta_len) + not_gamed_baseline - 1`):
a logistic model of the preference on the length difference,

    p_i = σ(θ + γ · tanh(Δ_i / std(Δ))),   Δ_i = len(model answer_i) − len(reference answer_i)  (characters),

fit by maximum likelihood with the soft labels (loss −Σ y log p + (1 − y) log(1 − p)), then read at zero length
difference: LC win rate = 100 · σ(θ). AlpacaEval's default GLM adds a per-instruction difficulty term learned on its
805 instructions (and a regularization to its gamed baselines); neither exists for an arbitrary prompt file, so
this is the minimal GLM of the same paper. std is the sample standard deviation (pandas' default, ddof = 1). The
fit is Newton's method on the two parameters with a tiny ridge (1e-6) so that a separable or constant set still
has a finite optimum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RIDGE = 1e-6


def win_rate(preferences: Sequence[float]) -> float:
    """100 · mean preference."""
    return float(np.mean(np.asarray(preferences, np.float64)) * 100) if len(preferences) else float("nan")


def length_feature(model_lengths: Sequence[float], reference_lengths: Sequence[float]) -> np.ndarray:
    """tanh(Δ / std(Δ)) per row (0 where every Δ is the same)."""
    delta = np.asarray(model_lengths, np.float64) - np.asarray(reference_lengths, np.float64)
    std = delta.std(ddof=1) if delta.size > 1 else 0.0
    return np.tanh(delta / std) if std > 0 else np.zeros_like(delta)


def fit_length_glm(preferences: Sequence[float], feature: np.ndarray, steps: int = 100) -> tuple[float, float]:
    """(θ, γ) maximizing Σ y log σ(θ + γ x) + (1 − y) log σ(−θ − γ x) − ridge/2 (θ² + γ²) by Newton's method."""
    y = np.asarray(preferences, np.float64)
    X = np.stack([np.ones_like(feature), feature], axis=1)
    w = np.zeros(2)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (y - p) - RIDGE * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + RIDGE * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w = w + step
        if np.max(np.abs(step)) < 1e-12:
            break
    return float(w[0]), float(w[1])


def length_controlled_win_rate(
    preferences: Sequence[float], model_lengths: Sequence[float], reference_lengths: Sequence[float]
) -> dict:
    """→ {win_rate, length_controlled_win_rate, theta, gamma} (rates in percent)."""
    if not len(preferences):
        return {"win_rate": None, "length_controlled_win_rate": None, "theta": None, "gamma": None}
    feature = length_feature(model_lengths, reference_lengths)
    theta, gamma = fit_length_glm(preferences, feature)
    return {
        "win_rate": win_rate(preferences),
        "length_controlled_win_rate": float(100 / (1 + np.exp(-theta))),
        "theta": theta,
        "gamma": gamma,
    }
