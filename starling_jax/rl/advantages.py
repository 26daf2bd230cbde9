"""Generalized advantage estimation (Schulman et al. 2016) over response tokens, and masked whitening.

Shapes: rewards, values, mask [B, T] (see `rl/__init__.py`). With m_t the response mask (a right-padded prefix of
ones), the value of the state after the last response token is 0 (the episode ends there):

  δ_t = r_t + γ · m_{t+1} · V_{t+1} − V_t              (m_T = 0: nothing follows the last column)
  A_t = m_t · (δ_t + γ λ · A_{t+1}),    A_T = 0
  R_t = A_t + V_t                                        (the critic's regression target, "returns")

so A_t = Σ_{l≥0} (γλ)^l δ_{t+l} over the response, exactly trlx's loop when the response fills the row, and
padding never leaks into a real token's advantage. Computed right to left with one `lax.scan`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def gae(rewards: Array, values: Array, mask: Array, gamma: float, lam: float) -> tuple[Array, Array]:
    """→ (advantages A [B, T], returns R [B, T]), float32, 0 on padding (see the module docstring)."""
    r = rewards.astype(jnp.float32)
    v = values.astype(jnp.float32)
    m = mask.astype(jnp.float32)
    next_v = jnp.concatenate([v[:, 1:] * m[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    deltas = r + gamma * next_v - v

    def step(next_adv, xs):  # carries A_{t+1}, emits A_t
        delta_t, m_t = xs
        adv_t = m_t * (delta_t + gamma * lam * next_adv)
        return adv_t, adv_t

    _, adv_rev = jax.lax.scan(step, jnp.zeros_like(r[:, 0]), (deltas.T[::-1], m.T[::-1]))
    advantages = adv_rev[::-1].T
    return advantages, (advantages + v) * m


def masked_mean(x: Array, mask: Array) -> Array:
    """Σ x·m / max(Σ m, 1)."""
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def masked_var(x: Array, mask: Array) -> Array:
    """Population variance of x over the mask (ddof 0)."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x - mean), mask)


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """x̂ = (x − μ) / sqrt(σ² + eps) over the masked entries (μ added back when `shift_mean` is False); padding
    stays 0. Starling did not whiten advantages (`rl.whiten_advantages: false`)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.astype(jnp.float32)
