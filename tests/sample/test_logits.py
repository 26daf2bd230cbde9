"""The per-step decoding math against brute-force numpy references, and a statistical test of the draws.

Statistical tests: a chi-square goodness-of-fit of 20,000 draws against the exact distribution, failing when the
p-value is below 1e-6 — a false-failure rate of 1e-6 per check (5 checks: < 1e-5 for the file). The draws are
fixed by the seed, so the test is deterministic; the rate says how unlucky a seed would have to be.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import stats  # noqa: E402

from starling_jax.sample import logits as L  # noqa: E402

P_MIN = 1e-6  # per-check false-failure rate of the chi-square tests
choose = jax.jit(L.choose, static_argnums=(3, 4, 5, 6))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_warp(logits, temperature, top_k, top_p):
    """transformers' warpers in numpy with a full sort: temperature, top-k, top-p (HF TopPLogitsWarper rule)."""
    x = logits.astype(np.float64) / temperature
    if 0 < top_k < x.shape[-1]:
        kth = np.sort(x, -1)[:, -top_k][:, None]
        x = np.where(x >= kth, x, -np.inf)
    if top_p < 1:
        p = softmax(x)
        order = np.argsort(p, -1)  # ascending
        cum = np.cumsum(np.take_along_axis(p, order, -1), -1)
        remove_sorted = cum <= 1 - top_p
        remove_sorted[:, -1] = False  # the most probable token is always kept
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, -1)
        x = np.where(remove, -np.inf, x)
    return softmax(x)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.75, 0.9, 0.999])
def test_top_p_mask_equals_sorting_reference(top_p):
    rng = np.random.default_rng(int(top_p * 1000))
    logits = (rng.standard_normal((64, 300)) * rng.uniform(0.2, 4, (64, 1))).astype(np.float32)
    probs = softmax(logits.astype(np.float64))
    ours = np.asarray(jax.jit(L.top_p_mask, static_argnums=1)(jnp.asarray(probs, jnp.float32), top_p))
    expected = reference_warp(logits, 1.0, 0, top_p) > 0
    np.testing.assert_array_equal(ours, expected)
    assert ours.any(-1).all()


def test_top_k_mask_and_warp_equal_reference():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((16, 50)).astype(np.float32)
    assert (np.asarray(L.top_k_mask(jnp.asarray(logits), 5)).sum(-1) == 5).all()
    assert np.asarray(L.top_k_mask(jnp.asarray(logits), 0)).all()
    for t, k, p in [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (0.5, 20, 0.9)]:
        ours = np.exp(np.asarray(jax.jit(L.warp, static_argnums=(1, 2, 3))(jnp.asarray(logits), t, k, p)))
        np.testing.assert_allclose(ours, reference_warp(logits, t, k, p), atol=2e-6)


def draws(logits, temperature, top_k, top_p, n=20_000, seed=0):
    """n independent next-token draws for the same logits (one row per draw, distinct row ids)."""
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, logits.shape[-1]))
    tokens, raw_lp, samp_lp = choose(batch, jax.random.key(seed), jnp.arange(n), 0, temperature, top_k, top_p)
    return np.asarray(tokens), np.asarray(raw_lp), np.asarray(samp_lp)


@pytest.mark.parametrize(
    "temperature,top_k,top_p,vocab",
    [(1.0, 0, 1.0, 8), (0.6, 0, 1.0, 8), (1.0, 4, 1.0, 8), (1.5, 0, 0.7, 8), (0.9, 0, 0.95, 700)],
)
def test_draws_follow_the_warped_distribution(temperature, top_k, top_p, vocab):
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal(vocab) * 1.5).astype(np.float32)
    if vocab > 8:  # a peaked distribution over several 128-token blocks (the two-level inverse CDF)
        logits[rng.choice(vocab, 6, replace=False)] += 6.0
    expected = reference_warp(logits[None], temperature, top_k, top_p)[0]
    tokens, raw_lp, samp_lp = draws(logits, temperature, top_k, top_p)
    counts = np.bincount(tokens, minlength=vocab)
    assert counts[expected == 0].sum() == 0, "a token outside the top-k / nucleus was drawn"
    support = expected > 0
    # pool the rare tokens so that every chi-square cell expects ≥ 5 draws
    big = support & (expected * len(tokens) >= 5)
    obs = np.append(counts[big], counts[support & ~big].sum())
    exp = np.append(expected[big], expected[support & ~big].sum()) * len(tokens)
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    p_value = stats.chisquare(obs, exp).pvalue
    assert p_value > P_MIN, (p_value, obs, exp)
    # the returned log-probs are those of the drawn tokens, under the raw model and the sampling distribution
    np.testing.assert_allclose(raw_lp, np.log(softmax(logits.astype(np.float64)))[tokens], atol=1e-5)
    np.testing.assert_allclose(samp_lp, np.log(expected[tokens]), atol=1e-4)


def test_draws_are_seeded_and_per_row():
    logits = np.random.default_rng(3).standard_normal((6, 40)).astype(np.float32)
    run = lambda rows, seed: np.asarray(
        choose(jnp.asarray(logits[rows]), jax.random.key(seed), jnp.asarray(rows), 2, 1.0, 0, 1.0)[0]
    )
    everything = run(np.arange(6), 0)
    np.testing.assert_array_equal(everything, run(np.arange(6), 0))
    np.testing.assert_array_equal(everything[[4, 1]], run(np.array([4, 1]), 0))  # independent of batch mates
    assert not np.array_equal(np.stack([run(np.arange(6), s) for s in range(1, 4)]), np.stack([everything] * 3))


def test_greedy_is_argmax_with_zero_sampling_logprob():
    logits = np.random.default_rng(4).standard_normal((5, 30)).astype(np.float32)
    tokens, raw_lp, samp_lp = choose(jnp.asarray(logits), jax.random.key(0), jnp.arange(5), 0, 0.0, 0, 1.0)
    np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))
    np.testing.assert_allclose(np.asarray(raw_lp), np.log(softmax(logits.astype(np.float64))).max(-1), atol=1e-5)
    assert not np.asarray(samp_lp).any()


def test_inverse_cdf_never_returns_a_zero_probability_token():
    probs = np.zeros((4, 300), np.float32)
    probs[:, [3, 140, 299]] = [0.2, 0.5, 0.3]
    u = jnp.array([0.0, 0.19999, 0.6, 0.9999999])
    np.testing.assert_array_equal(np.asarray(jax.jit(L.inverse_cdf)(jnp.asarray(probs), u)), [3, 3, 140, 299])
