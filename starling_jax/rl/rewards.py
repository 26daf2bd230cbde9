"""From a reward-model score to the per-token rewards PPO/APA optimize.

For each rollout b (prompt x, response y of n_b tokens, response mask m [B, T]):

1. score      s_b = RM(x, y) read at the last real token of the RM's rendering (`last_token_scores`; the index
              comes from explicit lengths, never from a pad id).
2. clip       s ← clip(s, −c, c)   in the RM's own units, before anything else (trlx's `cliprange_reward`;
              Starling: c = 10; c = 0 disables).
3. moments    the running moments of every CLIPPED score seen so far are updated with this batch
              (`update_reward_stats`, trlx's `RunningMoments.update`): count n, mean μ_run and the UNBIASED
              σ_run = sqrt(M2 / (n − 1)); the first batch's unbiased std is kept as σ_ref.
4. scale      (`normalize_scores`, mode chosen in config), with the moments of step 3, this batch included:
                none        s
                running_std s / σ_run          (trlx `scale_reward: running`, Starling's choice)
                ref         s / σ_ref          (trlx `scale_reward: ref`)
                running     (s − μ_run) / (σ_pop + 1e-6)   (centred; not in trlx: the embedded demo's default,
                            kept as it was measured, with the population std σ_pop = sqrt(M2 / n))
                rm_config   (s − reward_mean) / reward_std   (the statistics `train_rm` stores in the RM's
                            exported config.json; fixed, so the scale does not drift during the run)
5. penalty    s ← s − p · [response did not end with EOS]  (`missing_eos_penalty`; trl/OpenRLHF's option), in
              the units of the final reward.
6. per token  r_{b,t} = −β · kl_{b,t} · m_{b,t} + s_b · [t = n_b − 1]   (`token_rewards`): the KL penalty on
              every response token, the score on the last one.

Steps 2–4 are the authors' order (thwu1/trlx `AcceleratePPOTrainer.make_experience`): clip, `RunningMoments.update`
with the clipped scores, then divide by the running std that already includes them. trlx repeats that once per chunk
of `method.chunk_size` prompts until `num_rollouts` are collected, so chunk k is divided by the std of chunks 1..k;
starling_jax scores a whole rollout batch at once and updates the moments once per iteration, which is trlx with
chunk_size = num_rollouts (= `rollout.batch_size`). trlx starts `RunningMoments` at mean 0, var 1, count 1e-24: a
prior of weight 1e-24 that vanishes in the first update (count + n == n in floating point), so `init_reward_stats`
starts from zeros. Where trlx would divide by an undefined or zero std (fewer than two scores seen, or all equal)
the scale here is 1.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from starling_jax.errors import ConfigError

Array = jax.Array

SCORE_NORMALIZATIONS = ("none", "running_std", "ref", "running", "rm_config")


def last_token_scores(scores: Array, last_index: Array) -> Array:
    """s_b = scores[b, last_index[b]]: per-token RM scores [N, L], index [N] of the last real token → [N] f32."""
    picked = jnp.take_along_axis(scores, last_index[:, None].astype(jnp.int32), axis=1)[:, 0]
    return picked.astype(jnp.float32)


class RewardStats(NamedTuple):
    """Running moments of the clipped scores (float32 scalars): count n, mean μ, M2 = Σ (s − μ)², and σ_ref, the
    unbiased std of the first batch (0 before it; trlx's `ref_std`)."""

    count: Array
    mean: Array
    m2: Array
    ref_std: Array

    @property
    def std(self) -> Array:
        """Unbiased σ = sqrt(M2 / (n − 1)) (trlx `RunningMoments.std`); 1 before two scores were seen (trlx's
        initial std; its formula divides by zero there)."""
        return jnp.where(self.count > 1, jnp.sqrt(self.m2 / jnp.maximum(self.count - 1.0, 1.0)), 1.0)


def init_reward_stats() -> RewardStats:
    # Distinct buffers: the stats live in a donated state, where one buffer may not appear twice.
    return RewardStats(*(jnp.zeros((), jnp.float32) for _ in RewardStats._fields))


def update_reward_stats(stats: RewardStats, scores: Array, valid: Array | None = None) -> RewardStats:
    """Merges a batch of (clipped) scores into the running moments — trlx `RunningMoments.update`, i.e. Chan et
    al.'s parallel update, exact in any batch split:

      n' = n + n_b,   δ = μ_b − μ,   μ' = μ + δ · n_b / n',   M2' = M2 + M2_b + δ² · n · n_b / n'

    (trlx keeps var = M2 / n instead of M2: the same numbers). The first batch also sets σ_ref = sqrt(M2_b /
    (n_b − 1)) (torch's default unbiased `std`). `valid` [B] (optional) excludes padding rows.
    """
    scores = scores.astype(jnp.float32)
    w = jnp.ones_like(scores) if valid is None else valid.astype(jnp.float32)
    n_b = jnp.sum(w)
    mean_b = jnp.sum(w * scores) / jnp.maximum(n_b, 1.0)
    m2_b = jnp.sum(w * jnp.square(scores - mean_b))
    total = stats.count + n_b
    delta = mean_b - stats.mean
    safe_total = jnp.maximum(total, 1.0)
    first = (stats.count == 0) & (n_b > 0)
    ref_std = jnp.where(first, jnp.where(n_b > 1, jnp.sqrt(m2_b / jnp.maximum(n_b - 1.0, 1.0)), 1.0), stats.ref_std)
    return RewardStats(
        total,
        stats.mean + delta * n_b / safe_total,
        stats.m2 + m2_b + jnp.square(delta) * stats.count * n_b / safe_total,
        ref_std,
    )


@dataclasses.dataclass
class RewardConfig:
    normalize: str = "running_std"  # none | running_std | ref | running | rm_config (see the module docstring)
    clip: float = 10.0  # |raw score| bound, applied first, in the RM's units; 0 disables (Starling: 10)
    missing_eos_penalty: float = 0.0  # subtracted from the score of a response cut by max_new_tokens; 0 disables

    def __post_init__(self):
        if self.normalize not in SCORE_NORMALIZATIONS:
            raise ConfigError(f"rl.reward.normalize={self.normalize!r}: choose one of {list(SCORE_NORMALIZATIONS)}")
        if self.clip < 0 or self.missing_eos_penalty < 0:
            raise ConfigError("rl.reward.clip and rl.reward.missing_eos_penalty must be >= 0")


def _positive(x: Array) -> Array:
    """A divisor: x where positive, else 1 (a constant batch's zero std leaves the scores unscaled)."""
    return jnp.where(x > 0, x, 1.0)


def normalize_scores(
    scores: Array, mode: str, stats: RewardStats, reward_mean: float | None = None, reward_std: float | None = None
) -> Array:
    """Step 4 of the module docstring on clipped scores. `stats` must already include this batch
    (`update_reward_stats`), as trlx divides after `RunningMoments.update`."""
    scores = scores.astype(jnp.float32)
    if mode == "none":
        return scores
    if mode == "running_std":
        return scores / _positive(stats.std)
    if mode == "ref":
        return scores / _positive(stats.ref_std)
    if mode == "running":  # the demo's mode as measured (BENCHMARKS): population std, + eps
        return (scores - stats.mean) / (jnp.sqrt(stats.m2 / jnp.maximum(stats.count, 1.0)) + 1e-6)
    if mode == "rm_config":
        if reward_mean is None or not reward_std:
            raise ConfigError(
                "rl.reward.normalize=rm_config needs reward_mean and reward_std in the reward "
                "model's config.json (train_rm's export writes them)"
            )
        return (scores - reward_mean) / reward_std
    raise ConfigError(f"rl.reward.normalize={mode!r}: choose one of {list(SCORE_NORMALIZATIONS)}")


def clip_scores(scores: Array, bound: float) -> Array:
    """clip(s, −c, c); c = 0 leaves s unchanged."""
    return jnp.clip(scores, -bound, bound) if bound > 0 else scores


def missing_eos_penalty(scores: Array, ended_with_eos: Array, penalty: float) -> Array:
    """s − p · [no EOS]: `ended_with_eos` [B] bool (the row ended on EOS or was cut at a stop string and given
    one; not the length budget)."""
    return scores - penalty * (1.0 - ended_with_eos.astype(jnp.float32))


def shape_scores(
    cfg: RewardConfig,
    raw_scores: Array,
    ended_with_eos: Array,
    stats: RewardStats,
    reward_mean: float | None = None,
    reward_std: float | None = None,
    valid: Array | None = None,
) -> tuple[Array, RewardStats]:
    """Steps 2–5 on raw scores [B] → (final scores [B], updated running moments), in trlx's order: clip, update
    the moments with the clipped scores, scale by the updated moments, then the missing-EOS penalty."""
    scores = clip_scores(raw_scores.astype(jnp.float32), cfg.clip)
    stats = update_reward_stats(stats, scores, valid)
    scores = normalize_scores(scores, cfg.normalize, stats, reward_mean, reward_std)
    return missing_eos_penalty(scores, ended_with_eos, cfg.missing_eos_penalty), stats


def token_rewards(scores: Array, per_token_kl: Array, mask: Array, kl_coef: Array | float) -> Array:
    """r_{b,t} = −β · kl_{b,t} · m_{b,t} + s_b · [t = n_b − 1], n_b = Σ_t m_{b,t}: scores [B], kl and mask [B, T]
    → rewards [B, T] (float32). The mask is a right-padded prefix; a row with no response token gets no score."""
    m = mask.astype(jnp.float32)
    lengths = jnp.sum(m, axis=-1).astype(jnp.int32)
    last = jax.nn.one_hot(lengths - 1, m.shape[-1], dtype=jnp.float32)  # all-zero row when the length is 0
    return -kl_coef * per_token_kl.astype(jnp.float32) * m + scores.astype(jnp.float32)[:, None] * last
