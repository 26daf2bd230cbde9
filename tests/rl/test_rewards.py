"""Score shaping and per-token rewards against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from starling_jax.errors import ConfigError
from starling_jax.rl.rewards import (RewardConfig, init_reward_stats, last_token_scores, normalize_scores,
                                     shape_scores, token_rewards, update_reward_stats)


def test_running_stats_equal_pooled_moments_in_any_split():
    rng = np.random.default_rng(0)
    batches = [rng.normal(2.0, 3.0, size=n).astype(np.float32) for n in (7, 1, 16, 5)]
    stats = init_reward_stats()
    for b in batches:
        stats = update_reward_stats(stats, jnp.asarray(b))
    pooled = np.concatenate(batches)
    assert float(stats.count) == len(pooled)
    assert float(stats.mean) == pytest.approx(pooled.mean(), rel=1e-5)
    assert float(stats.std) == pytest.approx(pooled.std(), rel=1e-5)
    # padding rows (valid = False) do not count
    padded = update_reward_stats(init_reward_stats(), jnp.array([1.0, 3.0, 1e9]), jnp.array([True, True, False]))
    assert float(padded.count) == 2 and float(padded.mean) == 2.0 and float(padded.std) == 1.0


def test_normalize_clip_penalty():
    raw = jnp.array([2.0, -4.0, 40.0])
    stats = update_reward_stats(init_reward_stats(), raw)
    std, mean = np.std([2.0, -4.0, 40.0]), np.mean([2.0, -4.0, 40.0])
    np.testing.assert_allclose(normalize_scores(raw, "running_std", stats), np.array([2, -4, 40]) / std, rtol=1e-5)
    np.testing.assert_allclose(normalize_scores(raw, "running", stats), (np.array([2, -4, 40]) - mean) / std,
                               rtol=1e-5)
    np.testing.assert_allclose(normalize_scores(raw, "rm_config", stats, 1.0, 2.0), [0.5, -2.5, 19.5])
    with pytest.raises(ConfigError, match="reward_mean"):
        normalize_scores(raw, "rm_config", stats, None, None)
    cfg = RewardConfig(normalize="rm_config", clip=10.0, missing_eos_penalty=1.5)
    scores, new_stats = shape_scores(cfg, raw, jnp.array([True, False, False]), init_reward_stats(), 1.0, 2.0)
    np.testing.assert_allclose(scores, [0.5, -2.5 - 1.5, 10.0 - 1.5])  # clipped at 10 before the penalty
    assert float(new_stats.count) == 3
    with pytest.raises(ConfigError, match="normalize"):
        RewardConfig(normalize="zscore")


def test_last_token_scores_and_token_rewards():
    scores = jnp.arange(12.0).reshape(2, 6)
    np.testing.assert_allclose(last_token_scores(scores, jnp.array([3, 5])), [3.0, 11.0])
    kl = jnp.array([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    r = token_rewards(jnp.array([2.0, -1.0, 5.0]), kl, mask, 0.5)
    np.testing.assert_allclose(r, [[-0.05, -0.1, -0.15 + 2.0, 0.0], [-0.25 - 1.0, 0, 0, 0], [0, 0, 0, 0]],
                               rtol=1e-6)
