"""Score shaping against a transcription of the authors' trlx code, per-token rewards against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from starling_jax.errors import ConfigError
from starling_jax.rl.rewards import (
    RewardConfig,
    init_reward_stats,
    last_token_scores,
    normalize_scores,
    shape_scores,
    token_rewards,
    update_reward_stats,
)


class TrlxRunningMoments:
    """thwu1/trlx `trlx/utils/modeling.py` `RunningMoments`, transcribed (single process: no all-reduce)."""

    def __init__(self):
        self.mean, self.std, self.var, self.count = 0, 1, 1, 1e-24

    def update(self, xs: torch.Tensor):
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, correction=0)  # trlx: unbiased=False
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        tot_sum = old_sum + new_sum
        self.mean += delta * xs_count / tot_count
        self.var = tot_sum / tot_count
        self.std = (self.var * tot_count / (tot_count - 1)).sqrt()
        self.count = tot_count
        return xs_mean, (xs_var * xs_count / (xs_count - 1)).sqrt()


def trlx_scaled_scores(batches, cliprange_reward, scale_reward):
    """The score lines of thwu1/trlx `AcceleratePPOTrainer.make_experience`, one call per batch (chunk)."""
    running_moments, ref_mean, ref_std, out = TrlxRunningMoments(), None, None, []
    for raw in batches:
        scores = torch.tensor(raw, dtype=torch.float64).view(-1, 1)  # reward_fn: one score per sample
        scores_mask = scores != -np.inf
        if cliprange_reward:
            scores = torch.clip(scores, -cliprange_reward, cliprange_reward)
        if ref_mean is None:
            ref_mean, ref_std = (scores * scores_mask).sum(dim=1).mean(), (scores * scores_mask).sum(dim=1).std()
        running_moments.update(torch.sum(scores * scores_mask, dim=1))
        if scale_reward == "running":
            scores /= running_moments.std
        elif scale_reward == "ref":
            scores /= ref_std
        out.append(scores[:, 0].numpy())
    return out


@pytest.mark.parametrize("mode,trlx_mode", [("running_std", "running"), ("ref", "ref"), ("none", None)])
def test_scaling_equals_trlx_make_experience(mode, trlx_mode):
    # Five batches of RM scores with outliers far beyond the clip range (±10), of different sizes and scales: the
    # scaled scores equal the authors' clip → RunningMoments.update(clipped) → divide sequence at every iteration.
    rng = np.random.default_rng(3)
    batches = []
    for i, n in enumerate((16, 8, 16, 5, 12)):
        b = rng.normal(0.5 * i, 2.0 + i, size=n)
        b[rng.choice(n, 2, replace=False)] = rng.choice([-1, 1], 2) * rng.uniform(15.0, 80.0, 2)
        batches.append(b.astype(np.float32))
    want = trlx_scaled_scores(batches, 10.0, trlx_mode)
    cfg = RewardConfig(normalize=mode, clip=10.0)
    stats = init_reward_stats()
    step = jax.jit(lambda s, raw: shape_scores(cfg, raw, jnp.ones(raw.shape, bool), s))
    for raw, ref in zip(batches, want, strict=True):
        got, stats = step(stats, jnp.asarray(raw))
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-6)
    clipped = np.clip(np.concatenate(batches).astype(np.float64), -10, 10)
    assert float(stats.count) == len(clipped) and float(stats.std) == pytest.approx(clipped.std(ddof=1), rel=1e-6)
    assert np.abs(np.concatenate(batches)).max() > 50  # outliers really were clipped


def test_running_stats_equal_pooled_moments_in_any_split():
    rng = np.random.default_rng(0)
    batches = [rng.normal(2.0, 3.0, size=n).astype(np.float32) for n in (7, 1, 16, 5)]
    stats = init_reward_stats()
    for b in batches:
        stats = update_reward_stats(stats, jnp.asarray(b))
    pooled = np.concatenate(batches)
    assert float(stats.count) == len(pooled)
    assert float(stats.mean) == pytest.approx(pooled.mean(), rel=1e-5)
    assert float(stats.std) == pytest.approx(pooled.std(ddof=1), rel=1e-5)  # unbiased, as trlx
    assert float(stats.ref_std) == pytest.approx(batches[0].std(ddof=1), rel=1e-5)  # the first batch's
    # padding rows (valid = False) do not count
    padded = update_reward_stats(init_reward_stats(), jnp.array([1.0, 3.0, 1e9]), jnp.array([True, True, False]))
    assert float(padded.count) == 2 and float(padded.mean) == 2.0
    assert float(padded.std) == pytest.approx(np.sqrt(2.0)) and float(padded.ref_std) == pytest.approx(np.sqrt(2.0))
    # before two scores the std is trlx's initial 1 (its formula would divide by zero)
    assert float(init_reward_stats().std) == 1.0
    assert float(update_reward_stats(init_reward_stats(), jnp.array([4.0])).std) == 1.0


def test_clip_first_then_scale_then_penalty():
    raw = jnp.array([2.0, -4.0, 40.0])
    clipped = np.array([2.0, -4.0, 10.0])
    std, mean = np.std(clipped, ddof=1), np.mean(clipped)
    ended = jnp.array([True, False, True])
    for mode, want in [
        ("none", clipped),
        ("running_std", clipped / std),
        ("ref", clipped / std),
        ("running", (clipped - mean) / np.std(clipped)),
        ("rm_config", (clipped - 1.0) / 2.0),
    ]:
        cfg = RewardConfig(normalize=mode, clip=10.0, missing_eos_penalty=1.5)
        scores, stats = shape_scores(cfg, raw, ended, init_reward_stats(), 1.0, 2.0)
        np.testing.assert_allclose(scores, want - np.array([0, 1.5, 0]), rtol=1e-5, err_msg=mode)
        assert float(stats.count) == 3 and float(stats.mean) == pytest.approx(mean)  # moments of clipped scores
    # clip 0 disables clipping: the outlier is scaled as it is
    scores, _ = shape_scores(RewardConfig(normalize="running_std", clip=0.0), raw, ended, init_reward_stats())
    np.testing.assert_allclose(scores, np.array([2, -4, 40]) / np.std([2, -4, 40], ddof=1), rtol=1e-5)
    stats = update_reward_stats(init_reward_stats(), raw)
    with pytest.raises(ConfigError, match="reward_mean"):
        normalize_scores(raw, "rm_config", stats, None, None)
    with pytest.raises(ConfigError, match="normalize"):
        RewardConfig(normalize="zscore")


def test_last_token_scores_and_token_rewards():
    scores = jnp.arange(12.0).reshape(2, 6)
    np.testing.assert_allclose(last_token_scores(scores, jnp.array([3, 5])), [3.0, 11.0])
    kl = jnp.array([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    r = token_rewards(jnp.array([2.0, -1.0, 5.0]), kl, mask, 0.5)
    np.testing.assert_allclose(r, [[-0.05, -0.1, -0.15 + 2.0, 0.0], [-0.25 - 1.0, 0, 0, 0], [0, 0, 0, 0]], rtol=1e-6)
