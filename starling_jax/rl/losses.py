"""PPO and APA losses (pure functions of [B, T] response-token arrays, float32 inside).

Notation: log π_θ the current policy's log-probs of the sampled tokens, log π_old those at rollout time,
log π_init the reference (initial) policy's, A the advantages, V_θ the critic's values, V_old its values at
rollout time, R = A + V_old the returns, m the response mask; E_m[·] = Σ(·)·m / Σm (mean over real tokens).

PPO (Schulman et al. 2017), with ρ = exp(log π_θ − log π_old):
  L_pg  = E_m[ max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) ]
  L_vf  = ½ E_m[ max((V_θ − R)², (V_old + clip(V_θ − V_old, −ε_v, ε_v) − R)²) ]
  L_ent = E_m[ H(π_θ(·|s_t)) ]                           (an entropy bonus: subtracted)
  L     = L_pg + c_vf · L_vf − c_ent · L_ent

APA (Zhu et al. 2023, arXiv 2306.02231), a squared loss toward the advantage-tilted anchor policy:
  paper     L_apa = E_m[ (log π_θ − A/λ − log π_init)² ]    anchor π_init (the reference), coefficient 1/λ
  released  L_apa = E_m[ (log π_θ − A − log π_old)² ]       Starling's trlx fork: anchor π_old, 1/λ = 1
  L = g · L_apa + c_vf · L_vf − c_ent · L_ent, with the critic warm-up gate g = [L_vf ≤ τ] (stop-gradient):
  while the value loss of the minibatch is above τ only the critic trains (Starling: τ = 1). τ = 0 disables.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from starling_jax.errors import ConfigError
from starling_jax.rl.advantages import masked_mean

Array = jax.Array

ALGORITHMS = ("ppo", "apa")
APA_ANCHORS = ("init", "old")  # init: the paper's form (reference policy); old: the released code's (rollout)


def ppo_policy_loss(
    logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array, clip: float
) -> tuple[Array, dict[str, Array]]:
    """L_pg (module docstring) → (loss, {clip_frac, approx_kl, ratio_mean}). approx_kl = E_m[(ρ − 1) − log ρ]
    (the k3 estimate of KL(π_old‖π_θ) on rollout tokens)."""
    log_ratio = (logprobs.astype(jnp.float32) - old_logprobs.astype(jnp.float32)) * mask
    ratio = jnp.exp(log_ratio)
    adv = advantages.astype(jnp.float32)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    aux = {
        "clip_frac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(jax.lax.stop_gradient(ratio - 1.0 - log_ratio), mask),
        "ratio_mean": masked_mean(jax.lax.stop_gradient(ratio), mask),
    }
    return loss, aux


def value_loss(
    values: Array, old_values: Array, returns: Array, mask: Array, clip: float
) -> tuple[Array, dict[str, Array]]:
    """L_vf (module docstring) → (loss, {value_clip_frac, value_error}); clip ≤ 0 disables the clipped term.
    value_error = E_m[(V_θ − R)²] (unclipped, for logs)."""
    v = values.astype(jnp.float32)
    ret = returns.astype(jnp.float32)
    unclipped = jnp.square(v - ret)
    if clip > 0:
        v_old = old_values.astype(jnp.float32)
        clipped = jnp.square(v_old + jnp.clip(v - v_old, -clip, clip) - ret)
    else:
        clipped = unclipped
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)
    aux = {
        "value_clip_frac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "value_error": masked_mean(jax.lax.stop_gradient(unclipped), mask),
    }
    return loss, aux


def token_entropy(logits: Array) -> Array:
    """H(softmax(z)) = logsumexp(z) − Σ_v softmax(z)_v z_v per position: logits [..., V] → [...], float32."""
    z = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    return lse - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)


def apa_policy_loss(
    logprobs: Array, anchor_logprobs: Array, advantages: Array, mask: Array, inv_lambda: float
) -> Array:
    """L_apa = E_m[(log π_θ − (1/λ)·A − log π_anchor)²]; the anchor is π_init (paper) or π_old (released)."""
    target = anchor_logprobs.astype(jnp.float32) + inv_lambda * advantages.astype(jnp.float32)
    return masked_mean(jnp.square(logprobs.astype(jnp.float32) - target), mask)


def critic_warmup_gate(value_loss_value: Array, threshold: float) -> Array:
    """g = [L_vf ≤ τ] as float32, outside the gradient; τ ≤ 0 → always 1."""
    if threshold <= 0:
        return jnp.ones((), jnp.float32)
    return (jax.lax.stop_gradient(value_loss_value) <= threshold).astype(jnp.float32)


@dataclasses.dataclass
class LossConfig:
    clip: float = 0.2  # PPO ratio clip ε
    value_clip: float = 0.2  # ε_v; 0 disables value clipping
    vf_coef: float = 1.0
    entropy_coef: float = 0.0
    apa_anchor: str = "old"  # old: Starling's released code (π_old); init: the paper (π_init = the reference)
    apa_inv_lambda: float = 1.0  # 1/λ (released code: 1)
    critic_warmup_threshold: float = 1.0  # APA: only the critic trains while the value loss exceeds this; 0 = off

    def __post_init__(self):
        if self.apa_anchor not in APA_ANCHORS:
            raise ConfigError(f"rl.loss.apa_anchor={self.apa_anchor!r}: choose one of {list(APA_ANCHORS)}")
        if self.clip <= 0 or self.value_clip < 0 or self.vf_coef < 0 or self.entropy_coef < 0:
            raise ConfigError("rl.loss: clip must be > 0; value_clip, vf_coef, entropy_coef >= 0")


def actor_critic_loss(
    cfg: LossConfig, algorithm: str, logprobs: Array, entropy: Array, values: Array, batch: dict[str, Array]
) -> tuple[Array, dict[str, Array]]:
    """The total loss L of the module docstring for `algorithm` (ppo | apa).

    logprobs, entropy, values: [B, T] from the current actor and critic. `batch` (the experience): old_logprobs,
    ref_logprobs, old_values, advantages, returns, mask, all [B, T]. Returns (L, metrics) with policy_loss,
    value_loss, entropy, policy_weight (the warm-up gate; 1 for PPO) and the terms' diagnostics.
    """
    mask = batch["mask"].astype(jnp.float32)
    vf, vf_aux = value_loss(values, batch["old_values"], batch["returns"], mask, cfg.value_clip)
    mean_entropy = masked_mean(entropy, mask)
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm={algorithm!r}: choose one of {list(ALGORITHMS)}")
    if algorithm == "ppo":
        pg, aux = ppo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask, cfg.clip)
        gate = jnp.ones((), jnp.float32)
    else:
        anchor = batch["ref_logprobs"] if cfg.apa_anchor == "init" else batch["old_logprobs"]
        pg = apa_policy_loss(logprobs, anchor, batch["advantages"], mask, cfg.apa_inv_lambda)
        _, aux = ppo_policy_loss(
            jax.lax.stop_gradient(logprobs), batch["old_logprobs"], batch["advantages"], mask, cfg.clip
        )  # clip_frac / approx_kl as diagnostics only
        gate = critic_warmup_gate(vf, cfg.critic_warmup_threshold)
    loss = gate * pg + cfg.vf_coef * vf - cfg.entropy_coef * mean_entropy
    metrics = {
        "loss": loss,
        "policy_loss": pg,
        "value_loss": vf,
        "entropy": mean_entropy,
        "policy_weight": gate,
        **aux,
        **vf_aux,
    }
    return loss, metrics
