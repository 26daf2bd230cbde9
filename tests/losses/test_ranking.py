"""Tests of starling_jax.losses.ranking against brute-force references written independently of it."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starling_jax.errors import ConfigError
from starling_jax.losses import (
    RANKING_LOSSES,
    get_ranking_loss,
    pairwise_loss,
    plackett_luce_loss,
    ranking_loss,
    reward_centering_loss,
)

# Jitted wrappers: one compile per shape keeps the tests fast (eager op-by-op dispatch is slow on CPU).
pl = jax.jit(plackett_luce_loss)
pw = jax.jit(pairwise_loss)
pl_grad = jax.jit(jax.grad(lambda r, rk, m: plackett_luce_loss(r, rk, m)[0]))
pw_grad = jax.jit(jax.grad(lambda r, rk, m, s: pairwise_loss(r, rk, m, s)[0]))

# ----------------------------------------------------------------------------------------------------------
# Brute-force references (plain python / numpy float64).


def pl_probability(rewards, order):
    """P(order) = Π_j exp(r_order[j]) / Σ_{k≥j} exp(r_order[k]) (Plackett-Luce), plain python floats."""
    p = 1.0
    for j in range(len(order)):
        num = math.exp(rewards[order[j]])
        den = sum(math.exp(rewards[order[k]]) for k in range(j, len(order)))
        p *= num / den
    return p


def breslow_nll(rewards, ranks):
    """−Σ_j [r_j − log Σ_{k: rank_k ≥ rank_j} exp(r_k)], python loop over one prompt's (unmasked) answers."""
    total = 0.0
    for j in range(len(rewards)):
        den = sum(math.exp(rewards[k]) for k in range(len(rewards)) if ranks[k] >= ranks[j])
        total -= rewards[j] - math.log(den)
    return total


def pairwise_ref(rewards, ranks, mask, margin_scale):
    """Mean over prompts with ≥1 strictly ordered pair of the per-prompt mean of −log σ(r_j − r_k − m_jk)."""
    per_prompt = []
    for r, rk, m in zip(rewards, ranks, mask):
        terms = []
        for j in range(len(r)):
            for k in range(len(r)):
                if m[j] and m[k] and rk[j] < rk[k]:
                    x = r[j] - r[k] - margin_scale * (rk[k] - rk[j])
                    terms.append(-math.log(1.0 / (1.0 + math.exp(-x))))
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    return sum(per_prompt) / len(per_prompt) if per_prompt else 0.0


def random_ranking(rng, k):
    """Random rewards and a random strict rank assignment (ranks 1..k in shuffled positions)."""
    rewards = rng.normal(size=k) * 2.0
    ranks = rng.permutation(k) + 1.0
    return rewards, ranks


# ----------------------------------------------------------------------------------------------------------
# K-wise Plackett-Luce.


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_kwise_equals_brute_force_plackett_luce(k):
    rng = np.random.default_rng(k)
    for _ in range(3):
        rewards, ranks = random_ranking(rng, k)
        probs = {perm: pl_probability(rewards, perm) for perm in itertools.permutations(range(k))}
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)  # sanity of the brute force
        observed = tuple(int(i) for i in np.argsort(ranks))  # best first
        expected = -math.log(probs[observed])

        mask = np.ones((1, k), bool)
        with jax.enable_x64(True):
            loss64, aux = pl(jnp.asarray(rewards[None], jnp.float64), jnp.asarray(ranks[None], jnp.float64), mask)
            assert loss64.dtype == jnp.float64
            np.testing.assert_allclose(float(loss64), expected, rtol=1e-12, atol=1e-12)
            assert float(aux["num_valid_prompts"]) == 1.0
        loss32, _ = pl(jnp.asarray(rewards[None], jnp.float32), jnp.asarray(ranks[None], jnp.float32), mask)
        assert loss32.dtype == jnp.float32
        np.testing.assert_allclose(float(loss32), expected, rtol=1e-5, atol=1e-5)


def test_kwise_batch_mean_over_valid_prompts_with_mixed_k():
    """Rows of different K in one [B, 5] batch (missing answers masked): mean of the per-row PL NLLs."""
    rng = np.random.default_rng(0)
    K = 5
    rewards = rng.normal(size=(6, K))
    ranks = np.zeros((6, K))
    mask = np.zeros((6, K), bool)
    expected = []
    for b, k in enumerate([5, 2, 3, 1, 0, 4]):  # rows with 1 or 0 answers do not count
        ranks[b, :k] = rng.permutation(k) + 1
        mask[b, :k] = True
        if k >= 2:
            order = tuple(int(i) for i in np.argsort(ranks[b, :k]))
            expected.append(-math.log(pl_probability(rewards[b, :k], order)))
        else:
            expected.append(None)
    loss, aux = pl(jnp.asarray(rewards, jnp.float32), jnp.asarray(ranks, jnp.float32), mask)
    per = np.asarray(aux["per_prompt_loss"])
    for b, e in enumerate(expected):
        np.testing.assert_allclose(per[b], 0.0 if e is None else e, rtol=1e-5, atol=1e-5)
    assert float(aux["num_valid_prompts"]) == 4
    np.testing.assert_allclose(float(loss), np.mean([e for e in expected if e is not None]), rtol=1e-5)


def test_kwise_gradient_matches_central_finite_differences():
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(3, 5))
    ranks = np.array([[1, 2, 3, 4, 5], [3, 1, 2, 2, 9], [2, 1, 4, 3, 1]], float)  # incl. ties and a mask
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 0, 1, 1]], bool)
    with jax.enable_x64(True):
        f = lambda r: pl(r, jnp.asarray(ranks), mask)[0]  # noqa: E731
        r0 = jnp.asarray(rewards, jnp.float64)
        grad = np.asarray(jax.grad(f)(r0))
        eps = 1e-6
        fd = np.zeros_like(rewards)
        for idx in np.ndindex(rewards.shape):
            e = np.zeros_like(rewards)
            e[idx] = eps
            fd[idx] = (float(f(r0 + e)) - float(f(r0 - e))) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)
    assert np.all(grad[~mask] == 0.0)
    # Each prompt's gradient sums to 0 (shift invariance) and is nonzero where it should be.
    np.testing.assert_allclose(grad.sum(axis=1), 0.0, atol=1e-12)
    assert np.abs(grad[mask]).min() > 0


def test_kwise_shift_invariance():
    rng = np.random.default_rng(2)
    rewards = rng.normal(size=(4, 6)).astype(np.float32)
    ranks = np.stack([rng.permutation(6) + 1 for _ in range(4)]).astype(np.float32)
    ranks[1, 2] = ranks[1, 3]  # a tie
    mask = np.ones((4, 6), bool)
    mask[2, 4:] = False
    shift = np.array([[100.0], [-50.0], [3.0], [1000.0]], np.float32)
    base, aux0 = pl(rewards, ranks, mask)
    shifted, aux1 = pl(rewards + shift, ranks, mask)
    np.testing.assert_allclose(
        np.asarray(aux1["per_prompt_loss"]), np.asarray(aux0["per_prompt_loss"]), rtol=1e-4, atol=1e-3
    )
    np.testing.assert_allclose(float(shifted), float(base), rtol=1e-4, atol=1e-3)


def test_kwise_input_order_invariance():
    rng = np.random.default_rng(3)
    rewards = rng.normal(size=(3, 7)).astype(np.float32)
    ranks = np.array([[1, 2, 3, 4, 5, 6, 7], [1, 1, 2, 3, 3, 3, 4], [2, 1, 5, 3, 4, 7, 6]], np.float32)
    mask = np.array([[1] * 7, [1] * 6 + [0], [1, 1, 0, 1, 1, 1, 1]], bool)
    base, aux0 = pl(rewards, ranks, mask)
    for seed in range(3):
        perm = np.random.default_rng(100 + seed).permutation(7)
        loss, aux = pl(rewards[:, perm], ranks[:, perm], mask[:, perm])
        np.testing.assert_allclose(np.asarray(aux["per_prompt_loss"]), np.asarray(aux0["per_prompt_loss"]), rtol=1e-6)
        np.testing.assert_allclose(float(loss), float(base), rtol=1e-6)


def test_kwise_masked_answers_change_nothing_and_garbage_gives_no_nan():
    rewards3 = np.array([[0.3, -1.2, 2.0]], np.float32)
    ranks3 = np.array([[2.0, 3.0, 1.0]], np.float32)
    ref, _ = pl(rewards3, ranks3, np.ones((1, 3), bool))
    # The same 3 answers inside a K=5 row, masked slots in between holding garbage rewards and ranks.
    mask5 = np.array([[True, False, True, False, True]])
    for garbage_r, garbage_rank in [
        (0.0, 0.0),
        (1e30, -5.0),
        (-1e30, 1.0),
        (np.nan, np.nan),
        (np.inf, 2.0),
        (-np.inf, np.inf),
    ]:
        rewards5 = np.array([[0.3, garbage_r, -1.2, garbage_r, 2.0]], np.float32)
        ranks5 = np.array([[2.0, garbage_rank, 3.0, garbage_rank, 1.0]], np.float32)
        loss, aux = pl(rewards5, ranks5, mask5)
        np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
        grad = np.asarray(pl_grad(jnp.asarray(rewards5), ranks5, mask5))
        assert np.all(np.isfinite(grad)), (garbage_r, grad)
        assert grad[0, 1] == 0.0 and grad[0, 3] == 0.0
        ref_grad = np.asarray(pl_grad(jnp.asarray(rewards3), ranks3, np.ones((1, 3), bool)))
        np.testing.assert_allclose(grad[0, [0, 2, 4]], ref_grad[0], rtol=1e-6)


def test_kwise_breslow_ties_hand_computed():
    # ranks (1, 2, 2, 3): answers b and c are tied; each keeps the whole tie group in its denominator.
    a, b, c, d = 0.5, -0.25, 1.0, 0.0
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    expected = -((a - lse(a, b, c, d)) + (b - lse(b, c, d)) + (c - lse(b, c, d)) + (d - lse(d)))
    assert expected == pytest.approx(breslow_nll([a, b, c, d], [1, 2, 2, 3]))
    loss, _ = pl(np.array([[a, b, c, d]], np.float32), np.array([[1, 2, 2, 3]], np.float32), np.ones((1, 4), bool))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    # A tie for the worst place: both tied answers keep each other in the denominator (nonzero last terms).
    expected2 = -((a - lse(a, b, c)) + (b - lse(b, c)) + (c - lse(b, c)))
    loss2, _ = pl(np.array([[c, a, b]], np.float32), np.array([[2, 1, 2]], np.float32), np.ones((1, 3), bool))
    np.testing.assert_allclose(float(loss2), expected2, rtol=1e-6)
    # Random rows with many ties vs the loop reference.
    rng = np.random.default_rng(4)
    rewards = rng.normal(size=(8, 6))
    ranks = rng.integers(1, 4, size=(8, 6)).astype(float)
    per = np.asarray(
        pl(rewards.astype(np.float32), ranks.astype(np.float32), np.ones((8, 6), bool))[1]["per_prompt_loss"]
    )
    np.testing.assert_allclose(per, [breslow_nll(r, rk) for r, rk in zip(rewards, ranks)], rtol=1e-5)


def test_kwise_equals_bradley_terry_for_k2():
    r = np.array([[1.5, -0.5], [0.2, 0.9]], np.float32)
    ranks = np.array([[1, 2], [2, 1]], np.float32)
    mask = np.ones((2, 2), bool)
    expected = np.mean([math.log1p(math.exp(-2.0)), math.log1p(math.exp(-0.7))])
    np.testing.assert_allclose(float(pl(r, ranks, mask)[0]), expected, rtol=1e-6)
    np.testing.assert_allclose(float(pw(r, ranks, mask)[0]), expected, rtol=1e-6)


def test_kwise_no_valid_prompt_is_zero_with_zero_grad():
    rewards = np.array([[1.0, np.nan, 3.0], [2.0, 5.0, 7.0]], np.float32)
    ranks = np.array([[1, 2, 3], [1, 2, 3]], np.float32)
    mask = np.array([[True, False, False], [False, False, False]])
    for fn, fn_grad in ((pl, pl_grad), (pw, lambda r, rk, m: pw_grad(r, rk, m, 0.0))):
        loss, aux = fn(rewards, ranks, mask)
        assert float(loss) == 0.0 and float(aux["num_valid_prompts"]) == 0.0
        grad = np.asarray(fn_grad(jnp.asarray(rewards), ranks, mask))
        assert np.all(grad == 0.0)


def test_kwise_stable_for_large_rewards_and_jit_and_bf16():
    rewards = np.array([[1e4, -1e4, 0.0, 3e4]], np.float32)
    ranks = np.array([[1, 2, 3, 4]], np.float32)
    mask = np.ones((1, 4), bool)
    loss, _ = pl(rewards, ranks, mask)
    # Terms: 1e4 − lse(1e4,−1e4,0,3e4) ≈ −2e4; −1e4 − lse(−1e4, 0, 3e4) ≈ −4e4; 0 − lse(0, 3e4) ≈ −3e4.
    np.testing.assert_allclose(float(loss), 2e4 + 4e4 + 3e4, rtol=1e-6)
    grad = pl_grad(jnp.asarray(rewards), ranks, mask)
    assert np.all(np.isfinite(np.asarray(grad)))
    loss_bf16, aux = pl(jnp.asarray([[0.5, 0.25]], jnp.bfloat16), jnp.asarray([[1.0, 2.0]]), jnp.ones((1, 2), bool))
    assert loss_bf16.dtype == jnp.float32
    np.testing.assert_allclose(float(loss_bf16), math.log1p(math.exp(-0.25)), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Pairwise Bradley-Terry, centering, registry.


@pytest.mark.parametrize("margin_scale", [0.0, 0.5])
def test_pairwise_matches_loop_reference_with_ties_and_masks(margin_scale):
    rng = np.random.default_rng(5)
    rewards = rng.normal(size=(6, 5))
    ranks = rng.integers(1, 5, size=(6, 5)).astype(float)  # many ties
    ranks[3] = 2.0  # all tied: no valid pair, excluded from the mean
    mask = rng.random((6, 5)) > 0.2
    mask[0] = True
    rewards_garbage = np.where(mask, rewards, 1e30)
    expected = pairwise_ref(rewards, ranks, mask, margin_scale)
    loss, aux = pw(rewards_garbage.astype(np.float32), ranks.astype(np.float32), mask, margin_scale=margin_scale)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(aux["per_prompt_loss"][3]) == 0.0
    n_valid = sum(
        any(mask[b, j] and mask[b, k] and ranks[b, j] < ranks[b, k] for j in range(5) for k in range(5))
        for b in range(6)
    )
    assert float(aux["num_valid_prompts"]) == n_valid
    # Order invariance.
    perm = rng.permutation(5)
    loss_p, _ = pw(
        rewards_garbage[:, perm].astype(np.float32),
        ranks[:, perm].astype(np.float32),
        mask[:, perm],
        margin_scale=margin_scale,
    )
    np.testing.assert_allclose(float(loss_p), float(loss), rtol=1e-6)
    grad = np.asarray(pw_grad(jnp.asarray(rewards_garbage, jnp.float32), ranks.astype(np.float32), mask, margin_scale))
    assert np.all(np.isfinite(grad)) and np.all(grad[~mask] == 0.0)


def test_pairwise_margin_hand_computed():
    # ranks (1, 3): margin = 0.5 * 2 = 1; −log σ(2 − 0 − 1) = log(1 + e^-1).
    loss, _ = pw(
        np.array([[2.0, 0.0]], np.float32), np.array([[1.0, 3.0]], np.float32), np.ones((1, 2), bool), margin_scale=0.5
    )
    np.testing.assert_allclose(float(loss), math.log1p(math.exp(-1.0)), rtol=1e-6)


def test_reward_centering_loss():
    rewards = np.array([[1.0, 3.0, 1e30], [-2.0, 0.0, 5.0], [7.0, 7.0, 7.0]], np.float32)
    mask = np.array([[True, True, False], [True, True, True], [False, False, False]])
    # Per-prompt means 2 and 1 → (4 + 1) / 2; the all-masked row does not count.
    np.testing.assert_allclose(float(reward_centering_loss(rewards, mask)), 2.5, rtol=1e-6)
    grad = np.asarray(jax.grad(lambda r: reward_centering_loss(r, mask))(jnp.asarray(rewards)))
    # d/dr of ½ Σ_b mean_b² = mean_b / n_b per answer.
    np.testing.assert_allclose(grad, [[1.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 0.0]], rtol=1e-6)


def test_registry():
    assert set(RANKING_LOSSES) == {"kwise", "pairwise"}
    assert get_ranking_loss("kwise") is plackett_luce_loss
    assert get_ranking_loss("pairwise") is pairwise_loss
    with pytest.raises(ConfigError, match="kwise, pairwise"):
        get_ranking_loss("listnet")
    r = np.array([[1.0, 0.0, -1.0]], np.float32)
    rk = np.array([[1.0, 2.0, 3.0]], np.float32)
    m = np.ones((1, 3), bool)
    np.testing.assert_allclose(float(ranking_loss("kwise", r, rk, m)[0]), float(pl(r, rk, m)[0]))
    np.testing.assert_allclose(
        float(ranking_loss("pairwise", r, rk, m, margin_scale=0.3)[0]), float(pw(r, rk, m, margin_scale=0.3)[0])
    )
    with pytest.raises(ConfigError, match="margin_scale"):
        ranking_loss("kwise", r, rk, m, margin_scale=0.3)
    with pytest.raises(ConfigError):
        ranking_loss("nope", r, rk, m)
