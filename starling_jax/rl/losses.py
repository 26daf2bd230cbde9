"""PPO, APA, GRPO and RLOO losses (pure functions of [B, T] response-token arrays, float32 inside).

Notation: log π_θ the current policy's log-probs of the sampled tokens, log π_old those at rollout time,
log π_init the reference (initial) policy's, A the advantages, V_θ the critic's values, V_old its values at
rollout time, R = A + V_old the returns, m the response mask; E_m[·] = Σ(·)·m / Σm (mean over real tokens).

PPO (Schulman et al. 2017), with ρ = exp(log π_θ − log π_old) and the clip range [1 − ε_low, 1 + ε_high]
(`loss.clip_low`, `loss.clip_high`; both default to `loss.clip`, the symmetric clip; DAPO raises ε_high):
  ℓ_t   = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε_low, 1+ε_high))      (per token)
  L_pg  = Agg_m[ ℓ ]
  L_vf  = ½ E_m[ max((V_θ − R)², (V_old + clip(V_θ − V_old, −ε_v, ε_v) − R)²) ]
  L_ent = E_m[ H(π_θ(·|s_t)) ]                           (an entropy bonus: subtracted)
  L     = L_pg + c_vf · L_vf − c_ent · L_ent

Aggregation Agg_m (`loss.aggregation`; trl's `loss_type` in brackets), over the minibatch's B rows and T =
rollout.max_new_tokens columns:
  token_mean     Σ_{b,t} x·m / Σ_{b,t} m                    (trl "bnpo"; "dapo" over the global batch; the default)
  sequence_mean  (1/B) Σ_b [ Σ_t x·m / max(Σ_t m, 1) ]      (trl "grpo": each answer weighs the same)
  constant       Σ_{b,t} x·m / (B · T)                      (trl "dr_grpo", Dr. GRPO: no length bias)

GRPO / RLOO (critic-free; the advantages come from the answers' group, `experience.group_advantages`):
  L = Agg_m[ ℓ_t + β · k3_t · [kl.in_loss] ] − c_ent · L_ent,   k3_t = exp(log π_ref − log π_θ) − (log π_ref −
  log π_θ) − 1  (Schulman's k3, trl GRPO's `per_token_kl`); no value loss. Without `kl.in_loss` the KL is the
  per-token reward penalty of `rewards.token_rewards` instead (as PPO's).

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
from starling_jax.rl.kl import kl_k3

Array = jax.Array

ALGORITHMS = ("ppo", "apa", "grpo", "rloo")
CRITIC_FREE = ("grpo", "rloo")  # no critic: the group of answers to a prompt is the baseline
AGGREGATIONS = ("token_mean", "sequence_mean", "constant")
APA_ANCHORS = ("init", "old")  # init: the paper's form (reference policy); old: the released code's (rollout)


def aggregate(per_token: Array, mask: Array, aggregation: str = "token_mean") -> Array:
    """Agg_m[x] of the module docstring: per-token values [B, T] and mask [B, T] → a scalar (float32). `constant`
    divides by B · T (T = the columns of the array, rollout.max_new_tokens)."""
    x = per_token.astype(jnp.float32)
    m = mask.astype(jnp.float32)
    if aggregation == "token_mean":
        return masked_mean(x, m)
    if aggregation == "sequence_mean":
        return jnp.mean(jnp.sum(x * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0))
    if aggregation == "constant":
        return jnp.sum(x * m) / (x.shape[0] * x.shape[1])
    raise ConfigError(f"loss.aggregation={aggregation!r}: choose one of {list(AGGREGATIONS)}")


def ppo_policy_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    mask: Array,
    clip: float,
    clip_high: float | None = None,
    aggregation: str = "token_mean",
) -> tuple[Array, dict[str, Array]]:
    """L_pg (module docstring) with ε_low = `clip`, ε_high = `clip_high` (None: = `clip`) → (loss, {clip_frac,
    approx_kl, ratio_mean}). approx_kl = E_m[(ρ − 1) − log ρ] (the k3 estimate of KL(π_old‖π_θ) on rollout
    tokens)."""
    clip_high = clip if clip_high is None else clip_high
    log_ratio = (logprobs.astype(jnp.float32) - old_logprobs.astype(jnp.float32)) * mask
    ratio = jnp.exp(log_ratio)
    adv = advantages.astype(jnp.float32)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + clip_high)
    loss = aggregate(jnp.maximum(unclipped, clipped), mask, aggregation)
    aux = {
        "clip_frac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(jax.lax.stop_gradient(ratio - 1.0 - log_ratio), mask),
        "ratio_mean": masked_mean(jax.lax.stop_gradient(ratio), mask),
    }
    return loss, aux


def k3_kl_loss(logprobs: Array, ref_logprobs: Array) -> Array:
    """k3_t = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1 per token [B, T] (float32; `kl.kl_k3`, the
    log-ratio clamped to ±20): the KL term GRPO adds to its loss (times β) with `kl.in_loss`."""
    return kl_k3(logprobs, ref_logprobs)


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
    clip_low: float | None = None  # ε_low: the ratio's lower bound is 1 − ε_low (None: = clip)
    clip_high: float | None = None  # ε_high: the ratio's upper bound is 1 + ε_high (None: = clip; DAPO: 0.28)
    # token_mean | sequence_mean (trl's "grpo") | constant (Dr. GRPO: token sum / (rows × max_new_tokens))
    aggregation: str = "token_mean"
    value_clip: float = 0.2  # ε_v; 0 disables value clipping
    vf_coef: float = 1.0
    entropy_coef: float = 0.0
    apa_anchor: str = "old"  # old: Starling's released code (π_old); init: the paper (π_init = the reference)
    apa_inv_lambda: float = 1.0  # 1/λ (released code: 1)
    critic_warmup_threshold: float = 1.0  # APA: only the critic trains while the value loss exceeds this; 0 = off

    def __post_init__(self):
        if self.apa_anchor not in APA_ANCHORS:
            raise ConfigError(f"rl.loss.apa_anchor={self.apa_anchor!r}: choose one of {list(APA_ANCHORS)}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"loss.aggregation={self.aggregation!r}: choose one of {list(AGGREGATIONS)}")
        if self.clip <= 0 or self.value_clip < 0 or self.vf_coef < 0 or self.entropy_coef < 0:
            raise ConfigError("rl.loss: clip must be > 0; value_clip, vf_coef, entropy_coef >= 0")
        for key in ("clip_low", "clip_high"):
            value = getattr(self, key)
            if value is not None and not (0 < value and (key == "clip_high" or value < 1)):
                raise ConfigError(f"loss.{key}={value}: must be > 0{' and < 1' if key == 'clip_low' else ''}")

    @property
    def eps_low(self) -> float:
        return self.clip if self.clip_low is None else self.clip_low

    @property
    def eps_high(self) -> float:
        return self.clip if self.clip_high is None else self.clip_high


def critic_free_loss(
    cfg: LossConfig,
    logprobs: Array,
    entropy: Array,
    batch: dict[str, Array],
    kl_coef: Array | float = 0.0,
    kl_in_loss: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """GRPO / RLOO: L = Agg_m[ℓ_t + β·k3_t·[kl_in_loss]] − c_ent·L_ent (module docstring), β = `kl_coef`.

    logprobs, entropy: [B, T] of the current actor; `batch`: old_logprobs, ref_logprobs, advantages, mask [B, T].
    → (L, metrics: loss, policy_loss (the clipped term alone), kl_loss (Agg_m[k3], 0 without kl_in_loss), entropy,
    policy_weight (1) and the clip diagnostics)."""
    mask = batch["mask"].astype(jnp.float32)
    log_ratio = (logprobs.astype(jnp.float32) - batch["old_logprobs"].astype(jnp.float32)) * mask
    ratio = jnp.exp(log_ratio)
    adv = batch["advantages"].astype(jnp.float32)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    per_token = jnp.maximum(unclipped, clipped)
    pg = aggregate(per_token, mask, cfg.aggregation)
    if kl_in_loss:
        k3 = k3_kl_loss(logprobs, batch["ref_logprobs"])
        per_token = per_token + kl_coef * k3
        kl_term = aggregate(jax.lax.stop_gradient(k3), mask, cfg.aggregation)
    else:
        kl_term = jnp.zeros((), jnp.float32)
    mean_entropy = masked_mean(entropy, mask)
    loss = aggregate(per_token, mask, cfg.aggregation) - cfg.entropy_coef * mean_entropy
    metrics = {
        "loss": loss,
        "policy_loss": pg,
        "kl_loss": kl_term,
        "entropy": mean_entropy,
        "policy_weight": jnp.ones((), jnp.float32),
        "clip_frac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(jax.lax.stop_gradient(ratio - 1.0 - log_ratio), mask),
        "ratio_mean": masked_mean(jax.lax.stop_gradient(ratio), mask),
    }
    return loss, metrics


def actor_critic_loss(
    cfg: LossConfig,
    algorithm: str,
    logprobs: Array,
    entropy: Array,
    values: Array | None,
    batch: dict[str, Array],
    kl_coef: Array | float = 0.0,
    kl_in_loss: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """The total loss L of the module docstring for `algorithm` (ppo | apa | grpo | rloo).

    logprobs, entropy, values: [B, T] from the current actor and critic (values None for grpo / rloo: no critic).
    `batch` (the experience): old_logprobs, ref_logprobs, advantages, mask, and for ppo / apa old_values, returns,
    all [B, T]. `kl_coef`, `kl_in_loss`: β and whether β·k3 joins the policy loss (ppo, grpo, rloo). Returns
    (L, metrics) with policy_loss, value_loss, entropy, policy_weight (the warm-up gate; 1 for PPO) and the terms'
    diagnostics.
    """
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm={algorithm!r}: choose one of {list(ALGORITHMS)}")
    if algorithm in CRITIC_FREE:
        return critic_free_loss(cfg, logprobs, entropy, batch, kl_coef, kl_in_loss)
    mask = batch["mask"].astype(jnp.float32)
    vf, vf_aux = value_loss(values, batch["old_values"], batch["returns"], mask, cfg.value_clip)
    mean_entropy = masked_mean(entropy, mask)
    if algorithm == "ppo":
        pg, aux = ppo_policy_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], mask, cfg.eps_low, cfg.eps_high, cfg.aggregation
        )
        if kl_in_loss:
            pg = pg + kl_coef * aggregate(k3_kl_loss(logprobs, batch["ref_logprobs"]), mask, cfg.aggregation)
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
