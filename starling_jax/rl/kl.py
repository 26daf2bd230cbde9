"""Per-token KL to the reference policy, and the controllers of its coefficient β.

Estimators (Schulman, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html). With tokens sampled
from the policy, a ~ π(·|s), and the log-ratio  log r = log π_ref(a|s) − log π(a|s):

  k1 = −log r                    = log π − log π_ref      unbiased for KL(π‖π_ref), high variance, can be < 0
  k2 = ½ (log r)²                                        biased (exact to second order), always ≥ 0
  k3 = (r − 1) − log r                                   unbiased for KL(π‖π_ref), always ≥ 0, low variance

E_π[k1] = E_π[k3] = KL(π‖π_ref) because E_π[r] = 1. Starling / trlx penalize with k1 (the released reward is
r_t = −β·(log π_old − log π_ref)_t).

Controllers (state: the current β, a float32 scalar, so that it lives in the checkpointed RL state):

* fixed:    β_{n+1} = β_n.
* adaptive (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2; the rule of
  lm-human-preferences and trlx): with the mean per-sequence KL of the last rollout batch KL_n, a target
  KL_target and a horizon H (in rollouts),
      e_n     = clip(KL_n / KL_target − 1, −0.2, 0.2)
      β_{n+1} = β_n · (1 + e_n · n_steps / H)
  where n_steps is the number of rollouts in that batch. β grows while the KL is above target and shrinks
  below it, by at most 20% × n_steps/H per update.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from starling_jax.errors import ConfigError

Array = jax.Array


def kl_k1(logprobs: Array, ref_logprobs: Array) -> Array:
    """k1 = log π − log π_ref, elementwise (any shape, float32)."""
    return logprobs.astype(jnp.float32) - ref_logprobs.astype(jnp.float32)


def kl_k2(logprobs: Array, ref_logprobs: Array) -> Array:
    """k2 = ½ (log π_ref − log π)², elementwise."""
    return 0.5 * jnp.square(kl_k1(logprobs, ref_logprobs))


def kl_k3(logprobs: Array, ref_logprobs: Array) -> Array:
    """k3 = (r − 1) − log r with log r = log π_ref − log π, elementwise; computed with expm1 for accuracy near
    r = 1. The log-ratio is clamped to ±20 so that a token the reference finds impossible gives a large finite
    penalty instead of inf."""
    log_r = jnp.clip(-kl_k1(logprobs, ref_logprobs), -20.0, 20.0)
    return jnp.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[Array, Array], Array]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimator(name: str) -> Callable[[Array, Array], Array]:
    if name not in KL_ESTIMATORS:
        raise ConfigError(f"rl.kl_estimator={name!r}: choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name]


def sequence_kl(per_token_kl: Array, mask: Array) -> Array:
    """Σ_t kl_t · m_t over the response: [B, T] → [B] (the per-sequence KL the controller and logs use)."""
    return jnp.sum(per_token_kl * mask.astype(jnp.float32), axis=-1)


@dataclasses.dataclass
class KLConfig:
    coef: float = 0.01  # β at the start (Starling: fixed 0.01)
    estimator: str = "k1"  # k1 | k2 | k3: the per-token penalty in the reward (and the logged `kl`)
    # false: β·kl_t is a per-token reward penalty (Starling, trlx); true: no penalty in the reward, β·k3_t joins the
    # policy loss instead (trl GRPO; ppo, grpo and rloo; `losses.py`)
    in_loss: bool = False
    adaptive: bool = False  # False: fixed β; True: Ziegler et al.'s controller below
    target: float = 6.0  # target per-sequence KL (nats) of the adaptive controller
    horizon: int = 10000  # rollouts over which the adaptive controller moves β by up to ±20%

    def __post_init__(self):
        kl_estimator(self.estimator)
        if self.coef < 0:
            raise ConfigError(f"rl.kl.coef={self.coef}: must be >= 0")
        if self.adaptive and (self.target <= 0 or self.horizon <= 0):
            raise ConfigError("rl.kl.target and rl.kl.horizon must be > 0 with rl.kl.adaptive=true")


def init_kl_coef(cfg: KLConfig) -> Array:
    return jnp.asarray(cfg.coef, jnp.float32)


def fixed_kl_update(coef: Array, current_kl: Array, n_steps: int | Array) -> Array:
    """β_{n+1} = β_n."""
    del current_kl, n_steps
    return coef


def adaptive_kl_update(coef: Array, current_kl: Array, n_steps: int | Array, target: float, horizon: int) -> Array:
    """β_{n+1} = β_n · (1 + clip(KL_n / KL_target − 1, −0.2, 0.2) · n_steps / H)  (Ziegler et al. 2019)."""
    error = jnp.clip(jnp.asarray(current_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * jnp.asarray(n_steps, jnp.float32) / horizon)


def update_kl_coef(cfg: KLConfig, coef: Array, current_kl: Array, n_steps: int | Array) -> Array:
    """The configured controller's update (fixed or adaptive)."""
    if cfg.adaptive:
        return adaptive_kl_update(coef, current_kl, n_steps, cfg.target, cfg.horizon)
    return fixed_kl_update(coef, current_kl, n_steps)
