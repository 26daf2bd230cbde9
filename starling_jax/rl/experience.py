"""Experience: from a rollout batch to the arrays PPO/APA train on, and the minibatch loss of the update.

Rollout layout (what the sampler returns, concatenated): tokens [B, P + T] = LEFT-padded prompt [B, P] followed by
the completion [B, T] (right-padded with pad ids after each row's end; a row with a stop string cut to its answer +
EOS first, `rl/stops.py`); positions count 0..n−1 over each row's real
tokens; segment_ids are 1 on real tokens (prompt and generated), 0 on padding. Response token j of every row sits
at the same index P + j, so per-response-token quantities are static slices of the forward (no gather):

  logprob_j = log softmax(logits[:, P − 1 + j])[tokens[:, P + j]]       (the token's log-prob given its prefix)
  value_j   = critic score at index P − 1 + j                          (the state before emitting token j)

The padding rule of the decoder (attention only within segment 1, causal, window by index = position difference)
makes this layout exact with the mask-based attention (`attention_impl=einsum`).

`make_experience` (no gradient): actor log-probs (π_old), reference log-probs (a hydra top or a full copy), critic
values, per-token KL, shaped scores, per-token rewards, GAE advantages and returns — the formulas of `kl.py`,
`rewards.py` and `advantages.py`. `minibatch_loss`: the actor and critic forwards of the update and
`losses.actor_critic_loss`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from starling_jax.errors import ConfigError
from starling_jax.model.hydra import actor_logits, hydra_logits
from starling_jax.rl import advantages as adv_lib
from starling_jax.rl import kl as kl_lib
from starling_jax.rl import rewards as rewards_lib
from starling_jax.rl.losses import LossConfig, actor_critic_loss, token_entropy

Array = jax.Array


@dataclasses.dataclass
class AdvantageConfig:
    gamma: float = 1.0  # Starling: 1
    lam: float = 0.95  # Starling: 0.95
    whiten: bool = False  # Starling: no advantage whitening

    def __post_init__(self):
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"rl.advantage: gamma={self.gamma} and lam={self.lam} must lie in [0, 1]")


def response_logprobs(logits: Array, tokens: Array, prompt_len: int) -> tuple[Array, Array]:
    """logits [B, P+T, V], tokens [B, P+T] → (log-prob of each response token [B, T], entropy of the policy at
    each response step [B, T]), float32 (module docstring)."""
    step_logits = logits[:, prompt_len - 1 : -1].astype(jnp.float32)
    logp = jax.nn.log_softmax(step_logits, axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, prompt_len:, None].astype(jnp.int32), axis=-1)[..., 0]
    return chosen, token_entropy(step_logits)


def response_values(scores: Array, prompt_len: int) -> Array:
    """Critic per-token scores [B, P+T] → values of the states before each response token [B, T]."""
    return scores[:, prompt_len - 1 : -1].astype(jnp.float32)


def rollout_forward(actor, reference, critic, batch: dict, prompt_len: int, hydra: bool) -> dict[str, Array]:
    """One no-gradient pass: actor and reference log-probs and critic values [B, T]. `hydra`: the reference is a
    `ReferenceTop` on the actor's shared bottom (one bottom pass); else a full frozen `CausalLM` copy."""
    inputs = (batch["tokens"], batch["positions"], batch["segment_ids"])
    if hydra:
        actor_logits, ref_logits = hydra_logits(actor, reference, *inputs)
    else:  # a full frozen copy of the initial policy
        actor_logits, ref_logits = actor(*inputs), reference(*inputs)
    logprobs, entropy = response_logprobs(actor_logits, batch["tokens"], prompt_len)
    ref_logprobs, _ = response_logprobs(ref_logits, batch["tokens"], prompt_len)
    values = response_values(critic(*inputs), prompt_len)
    return jax.lax.stop_gradient(
        {"logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values, "entropy": entropy}
    )


def make_experience(
    forward: dict[str, Array],
    mask: Array,
    raw_scores: Array,
    ended_with_eos: Array,
    kl_coef: Array,
    reward_stats: rewards_lib.RewardStats,
    *,
    kl_cfg: kl_lib.KLConfig,
    reward_cfg: rewards_lib.RewardConfig,
    adv_cfg: AdvantageConfig,
    reward_mean: float | None = None,
    reward_std: float | None = None,
    valid: Array | None = None,
) -> tuple[dict[str, Array], rewards_lib.RewardStats, dict[str, Array]]:
    """Rollout forward + RM scores → (experience [B, T] arrays, updated reward statistics, rollout metrics).

    `valid` [B] marks real rows (padding rows of a fixed-shape batch get a zero mask)."""
    m = mask.astype(jnp.float32)
    if valid is not None:
        m = m * valid.astype(jnp.float32)[:, None]
    per_token_kl = kl_lib.kl_estimator(kl_cfg.estimator)(forward["logprobs"], forward["ref_logprobs"]) * m
    scores, reward_stats = rewards_lib.shape_scores(
        reward_cfg, raw_scores, ended_with_eos, reward_stats, reward_mean, reward_std, valid
    )
    rewards = rewards_lib.token_rewards(scores, per_token_kl, m, kl_coef)
    advantages, returns = adv_lib.gae(rewards, forward["values"], m, adv_cfg.gamma, adv_cfg.lam)
    if adv_cfg.whiten:
        advantages = adv_lib.whiten(advantages, m)
    experience = {
        "old_logprobs": forward["logprobs"],
        "ref_logprobs": forward["ref_logprobs"],
        "old_values": forward["values"],
        "advantages": advantages,
        "returns": returns,
        "mask": m,
    }
    rows = jnp.ones_like(raw_scores, jnp.float32) if valid is None else valid.astype(jnp.float32)
    n_rows = jnp.maximum(jnp.sum(rows), 1.0)
    seq_kl = kl_lib.sequence_kl(per_token_kl, m)
    metrics = {
        "score_raw": jnp.sum(raw_scores * rows) / n_rows,
        "score": jnp.sum(scores * rows) / n_rows,
        "kl": jnp.sum(seq_kl * rows) / n_rows,
        "kl_k3": jnp.sum(kl_lib.sequence_kl(kl_lib.kl_k3(forward["logprobs"], forward["ref_logprobs"]), m) * rows)
        / n_rows,
        "kl_coef": kl_coef,
        "entropy": adv_lib.masked_mean(forward["entropy"], m),
        "response_length": jnp.sum(m) / n_rows,
        "value_mean": adv_lib.masked_mean(forward["values"], m),
        "return_mean": adv_lib.masked_mean(returns, m),
        "advantage_mean": adv_lib.masked_mean(advantages, m),
    }
    return experience, reward_stats, metrics


def minibatch_loss(
    params: dict,
    minibatch: dict[str, Array],
    *,
    graphdefs: dict,
    loss_cfg: LossConfig,
    algorithm: str,
    prompt_len: int,
    frozen_layers: int = 0,
) -> tuple[Array, dict[str, Array]]:
    """params {"actor", "critic"} → the actor-critic loss of one minibatch (inputs + experience arrays).
    `frozen_layers`: the actor's bottom layers that never train (their backward pass is skipped)."""
    actor = nnx.merge(graphdefs["actor"], params["actor"])
    critic = nnx.merge(graphdefs["critic"], params["critic"])
    inputs = (minibatch["tokens"], minibatch["positions"], minibatch["segment_ids"])
    logits = actor_logits(actor, *inputs, frozen_layers) if frozen_layers else actor(*inputs)
    logprobs, entropy = response_logprobs(logits, minibatch["tokens"], prompt_len)
    values = response_values(critic(*inputs), prompt_len)
    return actor_critic_loss(loss_cfg, algorithm, logprobs, entropy, values, minibatch)
