"""GAE and whitening against plain numpy loops written independently of starling_jax.rl."""

import jax
import numpy as np
import pytest

from starling_jax.rl.advantages import gae, masked_mean, whiten

gae_jit = jax.jit(gae, static_argnames=("gamma", "lam"))


def numpy_gae(rewards, values, length, gamma, lam):
    """trlx's loop on one unpadded response of `length` tokens (the value after the last token is 0)."""
    adv = np.zeros(length)
    last = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t < length - 1 else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, adv + values[:length]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_numpy_loop_with_padding(gamma, lam):
    rng = np.random.default_rng(0)
    b, t = 5, 9
    lengths = np.array([9, 1, 4, 7, 0])
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    # Garbage on padding must not leak into real tokens.
    rewards = rng.normal(size=(b, t)).astype(np.float32)
    values = rng.normal(size=(b, t)).astype(np.float32)
    adv, ret = gae_jit(rewards, values, mask, gamma=gamma, lam=lam)
    adv, ret = np.asarray(adv), np.asarray(ret)
    for i, n in enumerate(lengths):
        ref_adv, ref_ret = numpy_gae(rewards[i].astype(np.float64), values[i].astype(np.float64), n, gamma, lam)
        np.testing.assert_allclose(adv[i, :n], ref_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret[i, :n], ref_ret, rtol=1e-5, atol=1e-5)
        assert np.all(adv[i, n:] == 0) and np.all(ret[i, n:] == 0)


def test_gae_hand_computed():
    # γ = 1, λ = 0.5, two tokens: δ1 = 2 − 1 = 1, δ0 = 0 + 1 − 0.5 = 0.5, A0 = 0.5 + 0.5·1 = 1.
    adv, ret = gae_jit(np.array([[0.0, 2.0]]), np.array([[0.5, 1.0]]), np.ones((1, 2)), gamma=1.0, lam=0.5)
    np.testing.assert_allclose(np.asarray(adv), [[1.0, 1.0]])
    np.testing.assert_allclose(np.asarray(ret), [[1.5, 2.0]])


def test_whiten_over_mask_only():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(4, 6)).astype(np.float32)
    mask = np.ones((4, 6), np.float32)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    x_pad = np.where(mask > 0, x, 1e6).astype(np.float32)  # padding values must not matter
    w = np.asarray(jax.jit(whiten)(x_pad, mask))
    real = x[mask > 0]
    np.testing.assert_allclose(w[mask > 0], (real - real.mean()) / real.std(), rtol=1e-4, atol=1e-4)
    assert np.all(w[mask == 0] == 0)
    kept = np.asarray(whiten(x, mask, shift_mean=False))
    np.testing.assert_allclose(kept[mask > 0], (real - real.mean()) / real.std() + real.mean(), rtol=1e-4)
    assert float(masked_mean(x_pad, mask)) == pytest.approx(real.mean(), rel=1e-5)
