"""Length-controlled win rate (AlpacaEval 2's GLM, minimal form): equal to an independent fit (scipy's optimizer on
the same likelihood, features built with pandas as alpaca_eval does); on synthetic annotations from a judge that
prefers longer answers the raw win rate moves with length and the controlled one does not."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize

from starling_jax.eval import winrate


def annotate(rng, n: int, verbosity: float, quality: float = 0.0, length_bias: float = 2.5):
    """A judge whose preference for the model's answer is σ(quality + length_bias · tanh(Δ / 300)) (Δ characters)."""
    reference = rng.integers(200, 800, n).astype(float)
    model = np.maximum(1.0, reference + rng.normal(verbosity, 250.0, n))
    p = 1 / (1 + np.exp(-(quality + length_bias * np.tanh((model - reference) / 300.0))))
    draws = rng.random(n)
    prefs = np.where(draws < p, 1.0, 0.0)
    prefs[rng.random(n) < 0.05] = 0.5  # a few ties
    return prefs, model, reference


def reference_lc(prefs, model_len, ref_len) -> float:
    """alpaca_eval's featurization (pandas: len_1 − len_2 over its sample std), the soft-label log loss, scipy."""
    delta = pd.Series(model_len) - pd.Series(ref_len)
    x = np.tanh((delta / delta.std()).to_numpy())

    def loss(w):
        z = w[0] + w[1] * x
        return -np.sum(prefs * -np.logaddexp(0, -z) + (1 - prefs) * -np.logaddexp(0, z))

    fit = minimize(loss, np.zeros(2), method="BFGS", options={"gtol": 1e-10})
    return 100 / (1 + np.exp(-fit.x[0]))


@pytest.mark.parametrize("verbosity", [-300.0, 0.0, 300.0])
def test_lc_win_rate_equals_a_reference_fit(verbosity):
    rng = np.random.default_rng(int(verbosity) + 1000)
    prefs, model, reference = annotate(rng, 500, verbosity, quality=0.4)
    got = winrate.length_controlled_win_rate(prefs, model, reference)
    assert got["length_controlled_win_rate"] == pytest.approx(reference_lc(prefs, model, reference), abs=1e-4)
    assert got["win_rate"] == pytest.approx(100 * prefs.mean())


def test_raw_win_rate_moves_with_length_the_controlled_one_does_not():
    rng = np.random.default_rng(0)
    results = {}
    for verbosity in (-400.0, 0.0, 400.0):  # the same quality (0: as good as the reference), different verbosity
        prefs, model, reference = annotate(rng, 3000, verbosity)
        results[verbosity] = winrate.length_controlled_win_rate(prefs, model, reference)
    raw = [results[v]["win_rate"] for v in (-400.0, 0.0, 400.0)]
    lc = [results[v]["length_controlled_win_rate"] for v in (-400.0, 0.0, 400.0)]
    assert raw[0] < 30 and 40 < raw[1] < 60 and raw[2] > 70  # verbosity buys raw win rate
    assert max(lc) - min(lc) < 6 and all(abs(x - 50) < 5 for x in lc)  # ...not the controlled one
    assert all(r["gamma"] > 1 for r in results.values())  # the fitted length effect is the judge's bias


def test_degenerate_inputs():
    same = winrate.length_controlled_win_rate([1.0, 0.0, 1.0, 1.0], [5, 5, 5, 5], [5, 5, 5, 5])  # Δ constant
    assert same["length_controlled_win_rate"] == pytest.approx(75.0, abs=1e-3)
    assert winrate.length_controlled_win_rate([], [], [])["win_rate"] is None
    allwin = winrate.length_controlled_win_rate([1.0] * 6, [1, 2, 3, 4, 5, 6], [3] * 6)  # separable: finite
    assert 50 < allwin["length_controlled_win_rate"] <= 100 and np.isfinite(allwin["theta"])
