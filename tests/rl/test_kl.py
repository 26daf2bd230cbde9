"""KL estimators on distributions with a closed-form KL; the KL-coefficient controllers' update rules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starling_jax.errors import ConfigError
from starling_jax.rl.kl import (
    KLConfig,
    adaptive_kl_update,
    init_kl_coef,
    kl_estimator,
    kl_k1,
    kl_k2,
    kl_k3,
    sequence_kl,
    update_kl_coef,
)


def test_exact_expectation_on_categoricals():
    # E_{a~p}[k(a)] summed exactly over the support equals KL(p‖q) = Σ p log(p/q) for the unbiased k1 and k3.
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    kl = float(np.sum(p * np.log(p / q)))
    logp, logq = jnp.log(jnp.asarray(p, jnp.float32)), jnp.log(jnp.asarray(q, jnp.float32))
    assert float(jnp.sum(p * kl_k1(logp, logq))) == pytest.approx(kl, rel=1e-5)
    assert float(jnp.sum(p * kl_k3(logp, logq))) == pytest.approx(kl, rel=1e-5)
    # k2 is biased: its expectation is ½E[(log q/p)²], which differs from KL at this distance.
    k2 = float(jnp.sum(p * kl_k2(logp, logq)))
    assert k2 == pytest.approx(float(np.sum(p * 0.5 * np.log(q / p) ** 2)), rel=1e-5) and abs(k2 - kl) > 1e-3
    assert np.all(np.asarray(kl_k3(logp, logq)) >= 0) and np.any(np.asarray(kl_k1(logp, logq)) < 0)


@pytest.mark.parametrize("mu,sigma", [(0.3, 1.2), (0.1, 1.0)])
def test_monte_carlo_on_gaussians(mu, sigma):
    # p = N(0, 1), q = N(μ, σ²): KL(p‖q) = log σ + (1 + μ²)/(2σ²) − ½. Samples from p; each mean must fall within
    # 5 standard errors of the truth (false-failure probability < 1e-6 per check under the CLT).
    n = 200_000
    kl = math.log(sigma) + (1 + mu * mu) / (2 * sigma * sigma) - 0.5
    x = jax.random.normal(jax.random.key(0), (n,))
    logp = -0.5 * x**2 - 0.5 * math.log(2 * math.pi)
    logq = -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    k1, k3 = np.asarray(kl_k1(logp, logq), np.float64), np.asarray(kl_k3(logp, logq), np.float64)
    for k in (k1, k3):
        assert abs(k.mean() - kl) < 5 * k.std() / math.sqrt(n)
    if kl < 0.01:  # the reason k3 exists: far lower variance for nearby distributions
        assert k3.std() < 0.2 * k1.std()


def test_sequence_kl_masks_padding():
    per_token = jnp.array([[1.0, 2.0, 100.0], [0.5, 0.0, 0.0]])
    np.testing.assert_allclose(sequence_kl(per_token, jnp.array([[1, 1, 0], [1, 0, 0]])), [3.0, 0.5])


def test_adaptive_controller_update_rule():
    # β' = β (1 + clip(KL/target − 1, −0.2, 0.2) · n/H), hand-computed.
    beta = jnp.float32(0.1)
    assert float(adaptive_kl_update(beta, 9.0, 64, target=6.0, horizon=10000)) == pytest.approx(
        0.1 * (1 + 0.2 * 64 / 10000)
    )
    assert float(adaptive_kl_update(beta, 6.6, 64, target=6.0, horizon=10000)) == pytest.approx(
        0.1 * (1 + 0.1 * 64 / 10000)
    )
    assert float(adaptive_kl_update(beta, 0.0, 64, target=6.0, horizon=10000)) == pytest.approx(
        0.1 * (1 - 0.2 * 64 / 10000)
    )
    assert float(adaptive_kl_update(beta, 6.0, 64, target=6.0, horizon=10000)) == pytest.approx(0.1)
    # Jitted, iterated: a KL held above target makes β grow geometrically, at the capped rate.
    step = jax.jit(lambda b: adaptive_kl_update(b, 100.0, 100, target=1.0, horizon=1000))
    b = beta
    for _ in range(10):
        b = step(b)
    assert float(b) == pytest.approx(0.1 * 1.02**10, rel=1e-5)


def test_config_selects_controller_and_estimator():
    fixed, adaptive = KLConfig(coef=0.01), KLConfig(coef=0.01, adaptive=True, target=1.0, horizon=100)
    beta = init_kl_coef(fixed)
    assert float(update_kl_coef(fixed, beta, 50.0, 64)) == pytest.approx(0.01)
    assert float(update_kl_coef(adaptive, beta, 50.0, 64)) == pytest.approx(0.01 * (1 + 0.2 * 0.64))
    assert kl_estimator("k3") is kl_k3
    with pytest.raises(ConfigError, match="kl_estimator"):
        KLConfig(estimator="k4")
    with pytest.raises(ConfigError, match="target"):
        KLConfig(adaptive=True, target=0.0)
