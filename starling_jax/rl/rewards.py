"""From a reward-model score to the per-token rewards PPO/APA optimize.

For each rollout b (prompt x, response y of n_b tokens, response mask m [B, T]):

1. score      s_b = RM(x, y) read at the last real token of the RM's rendering (`last_token_scores`; the index
              comes from explicit lengths, never from a pad id).
2. normalize  (`normalize_scores`, mode chosen in config)
                none        s
                running_std s / σ_run          (trlx `scale_reward: running`, Starling's choice)
                running     (s − μ_run) / σ_run
                rm_config   (s − reward_mean) / reward_std   (the statistics `train_rm` stores in the RM's
                            exported config.json; fixed, so the scale does not drift during the run)
              μ_run, σ_run: running moments of every raw score seen so far, this batch included (`RewardStats`,
              updated before normalizing, as trlx does).
3. clip       s ← clip(s, −c, c)   (Starling: c = 10; c = 0 disables), after normalizing (trlx's order).
4. penalty    s ← s − p · [response did not end with EOS]  (`missing_eos_penalty`; trl/OpenRLHF's option), in
              the units of the final reward.
5. per token  r_{b,t} = −β · kl_{b,t} · m_{b,t} + s_b · [t = n_b − 1]   (`token_rewards`): the KL penalty on
              every response token, the score on the last one.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from starling_jax.errors import ConfigError

Array = jax.Array

SCORE_NORMALIZATIONS = ("none", "running_std", "running", "rm_config")


def last_token_scores(scores: Array, last_index: Array) -> Array:
    """s_b = scores[b, last_index[b]]: per-token RM scores [N, L], index [N] of the last real token → [N] f32."""
    picked = jnp.take_along_axis(scores, last_index[:, None].astype(jnp.int32), axis=1)[:, 0]
    return picked.astype(jnp.float32)


class RewardStats(NamedTuple):
    """Running moments of raw scores (float32 scalars): count n, mean μ, and M2 = Σ (s − μ)²."""

    count: Array
    mean: Array
    m2: Array

    @property
    def var(self) -> Array:
        """Population variance M2 / n (0 before any score)."""
        return self.m2 / jnp.maximum(self.count, 1.0)

    @property
    def std(self) -> Array:
        return jnp.sqrt(self.var)


def init_reward_stats() -> RewardStats:
    # Three distinct buffers: the stats live in a donated state, where one buffer may not appear twice.
    return RewardStats(*(jnp.zeros((), jnp.float32) for _ in range(3)))


def update_reward_stats(stats: RewardStats, scores: Array, valid: Array | None = None) -> RewardStats:
    """Merges a batch into the running moments (Chan et al.'s parallel update, exact in any batch split):

      n' = n + n_b,   δ = μ_b − μ,   μ' = μ + δ · n_b / n',   M2' = M2 + M2_b + δ² · n · n_b / n'

    `valid` [B] (optional) excludes padding rows.
    """
    scores = scores.astype(jnp.float32)
    w = jnp.ones_like(scores) if valid is None else valid.astype(jnp.float32)
    n_b = jnp.sum(w)
    mean_b = jnp.sum(w * scores) / jnp.maximum(n_b, 1.0)
    m2_b = jnp.sum(w * jnp.square(scores - mean_b))
    total = stats.count + n_b
    delta = mean_b - stats.mean
    safe_total = jnp.maximum(total, 1.0)
    return RewardStats(total, stats.mean + delta * n_b / safe_total,
                       stats.m2 + m2_b + jnp.square(delta) * stats.count * n_b / safe_total)


@dataclasses.dataclass
class RewardConfig:
    normalize: str = "running_std"  # none | running_std | running | rm_config (see the module docstring)
    clip: float = 10.0  # |score| bound after normalizing; 0 disables (Starling: 10)
    missing_eos_penalty: float = 0.0  # subtracted from the score of a response cut by max_new_tokens; 0 disables

    def __post_init__(self):
        if self.normalize not in SCORE_NORMALIZATIONS:
            raise ConfigError(f"rl.reward.normalize={self.normalize!r}: choose one of {list(SCORE_NORMALIZATIONS)}")
        if self.clip < 0 or self.missing_eos_penalty < 0:
            raise ConfigError("rl.reward.clip and rl.reward.missing_eos_penalty must be >= 0")


def normalize_scores(scores: Array, mode: str, stats: RewardStats, reward_mean: float | None = None,
                     reward_std: float | None = None, eps: float = 1e-6) -> Array:
    """Step 2 of the module docstring. `stats` must already include this batch (see `update_reward_stats`)."""
    scores = scores.astype(jnp.float32)
    if mode == "none":
        return scores
    if mode == "running_std":
        return scores / (stats.std + eps)
    if mode == "running":
        return (scores - stats.mean) / (stats.std + eps)
    if mode == "rm_config":
        if reward_mean is None or not reward_std:
            raise ConfigError("rl.reward.normalize=rm_config needs reward_mean and reward_std in the reward "
                              "model's config.json (train_rm's export writes them)")
        return (scores - reward_mean) / reward_std
    raise ConfigError(f"rl.reward.normalize={mode!r}: choose one of {list(SCORE_NORMALIZATIONS)}")


def clip_scores(scores: Array, bound: float) -> Array:
    """clip(s, −c, c); c = 0 leaves s unchanged."""
    return jnp.clip(scores, -bound, bound) if bound > 0 else scores


def missing_eos_penalty(scores: Array, ended_with_eos: Array, penalty: float) -> Array:
    """s − p · [no EOS]: `ended_with_eos` [B] bool (finish reason eos or stop string, not the length budget)."""
    return scores - penalty * (1.0 - ended_with_eos.astype(jnp.float32))


def shape_scores(cfg: RewardConfig, raw_scores: Array, ended_with_eos: Array, stats: RewardStats,
                 reward_mean: float | None = None, reward_std: float | None = None,
                 valid: Array | None = None) -> tuple[Array, RewardStats]:
    """Steps 2–4 on raw scores [B] → (final scores [B], updated running moments)."""
    stats = update_reward_stats(stats, raw_scores, valid)
    scores = normalize_scores(raw_scores, cfg.normalize, stats, reward_mean, reward_std)
    scores = clip_scores(scores, cfg.clip)
    return missing_eos_penalty(scores, ended_with_eos, cfg.missing_eos_penalty), stats


def token_rewards(scores: Array, per_token_kl: Array, mask: Array, kl_coef: Array | float) -> Array:
    """r_{b,t} = −β · kl_{b,t} · m_{b,t} + s_b · [t = n_b − 1], n_b = Σ_t m_{b,t}: scores [B], kl and mask [B, T]
    → rewards [B, T] (float32). The mask is a right-padded prefix; a row with no response token gets no score."""
    m = mask.astype(jnp.float32)
    lengths = jnp.sum(m, axis=-1).astype(jnp.int32)
    last = jax.nn.one_hot(lengths - 1, m.shape[-1], dtype=jnp.float32)  # all-zero row when the length is 0
    return -kl_coef * per_token_kl.astype(jnp.float32) * m + scores.astype(jnp.float32)[:, None] * last
