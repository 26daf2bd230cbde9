"""PPO and APA losses against hand-computed values (each number below is worked out in the comment beside it)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starling_jax.errors import ConfigError
from starling_jax.rl.losses import (
    LossConfig,
    actor_critic_loss,
    apa_policy_loss,
    critic_warmup_gate,
    ppo_policy_loss,
    token_entropy,
    value_loss,
)

MASK = jnp.array([[1.0, 1.0, 0.0]])  # the third token is padding: its (absurd) values must not count


def test_ppo_policy_loss_hand_computed():
    logp = jnp.array([[0.5, -0.1, 50.0]])
    old = jnp.zeros((1, 3))
    adv = jnp.array([[1.0, -2.0, 7.0]])
    loss, aux = ppo_policy_loss(logp, old, adv, MASK, clip=0.2)
    # token 0: ρ = e^0.5 = 1.6487 → max(−1.6487, −1.2) = −1.2 (clipped); token 1: ρ = e^-0.1 = 0.9048 inside
    # [0.8, 1.2] → max(1.8097, 1.8097) = 1.8097 (not clipped). Mean over the 2 real tokens.
    r1 = math.exp(-0.1)
    assert float(loss) == pytest.approx((-1.2 + 2 * r1) / 2, rel=1e-6)
    assert float(aux["clip_frac"]) == pytest.approx(0.5)
    kl = ((math.exp(0.5) - 1 - 0.5) + (r1 - 1 + 0.1)) / 2
    assert float(aux["approx_kl"]) == pytest.approx(kl, rel=1e-5)
    # d loss / d logp: the clipped token has no gradient; the other −A·ρ / n = 2·e^-0.1 / 2.
    grad = jax.grad(lambda lp: ppo_policy_loss(lp, old, adv, MASK, 0.2)[0])(logp)
    np.testing.assert_allclose(np.asarray(grad), [[0.0, r1, 0.0]], rtol=1e-6)


def test_value_loss_hand_computed():
    values = jnp.array([[2.0, 0.0, 9.0]])
    old = jnp.array([[1.0, 0.5, 0.0]])
    returns = jnp.array([[1.5, -1.0, 0.0]])
    loss, aux = value_loss(values, old, returns, MASK, clip=0.2)
    # token 0: (2 − 1.5)² = 0.25 vs clipped V = 1.2 → 0.09: max 0.25; token 1: (0 + 1)² = 1 vs clipped V = 0.3 →
    # 1.69: max 1.69 (clipped). L = ½ · (0.25 + 1.69) / 2 = 0.485.
    assert float(loss) == pytest.approx(0.485, rel=1e-6)
    assert float(aux["value_clip_frac"]) == pytest.approx(0.5)
    assert float(aux["value_error"]) == pytest.approx((0.25 + 1.0) / 2)
    unclipped, _ = value_loss(values, old, returns, MASK, clip=0.0)
    assert float(unclipped) == pytest.approx(0.5 * 1.25 / 2)


def test_apa_loss_both_forms_hand_computed():
    logp = jnp.array([[-1.0, -2.0, 3.0]])
    anchor = jnp.array([[-1.5, -1.0, 0.0]])
    adv = jnp.array([[0.4, -0.6, 5.0]])
    # released form, 1/λ = 1: residuals −1 − 0.4 + 1.5 = 0.1 and −2 + 0.6 + 1 = −0.4 → (0.01 + 0.16) / 2.
    assert float(apa_policy_loss(logp, anchor, adv, MASK, 1.0)) == pytest.approx(0.085, rel=1e-6)
    # paper form with 1/λ = 2: −1 − 0.8 + 1.5 = −0.3 and −2 + 1.2 + 1 = 0.2 → (0.09 + 0.04) / 2.
    assert float(apa_policy_loss(logp, anchor, adv, MASK, 2.0)) == pytest.approx(0.065, rel=1e-6)


def test_entropy():
    logits = jnp.array([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    p = np.exp([1.0, 2.0, 3.0, 4.0]) / np.exp([1.0, 2.0, 3.0, 4.0]).sum()
    np.testing.assert_allclose(
        np.asarray(token_entropy(logits)), [math.log(4), 0.0, -(p * np.log(p)).sum()], rtol=1e-5, atol=1e-6
    )


def _experience():
    return {
        "old_logprobs": jnp.array([[-1.0, -1.0, 0.0]]),
        "ref_logprobs": jnp.array([[-1.2, -0.8, 0.0]]),
        "old_values": jnp.array([[0.0, 0.0, 0.0]]),
        "advantages": jnp.array([[0.5, -0.5, 0.0]]),
        "returns": jnp.array([[0.5, -0.5, 0.0]]),
        "mask": MASK,
    }


def test_actor_critic_loss_selects_algorithm_and_anchor():
    batch = _experience()
    logp, ent, values = jnp.array([[-0.9, -1.1, 0.0]]), jnp.array([[1.0, 3.0, 9.0]]), jnp.array([[0.4, -0.4, 0.0]])
    # V_θ = ±0.4 is 0.4 from V_old = 0: clipped to ±0.2, (0.2 − 0.5)² = 0.09 > (0.4 − 0.5)² = 0.01 on both tokens.
    vf = 0.5 * (0.09 + 0.09) / 2
    cfg = LossConfig(entropy_coef=0.1, vf_coef=0.5)
    loss, m = actor_critic_loss(cfg, "ppo", logp, ent, values, batch)
    pg = float(ppo_policy_loss(logp, batch["old_logprobs"], batch["advantages"], MASK, 0.2)[0])
    assert float(loss) == pytest.approx(pg + 0.5 * vf - 0.1 * 2.0, rel=1e-6)
    # APA anchored at π_old (released): residuals −0.9 − 0.5 + 1 = −0.4, −1.1 + 0.5 + 1 = 0.4 → 0.16.
    _, m = actor_critic_loss(LossConfig(apa_anchor="old"), "apa", logp, ent, values, batch)
    assert float(m["policy_loss"]) == pytest.approx(0.16, rel=1e-6)
    # anchored at π_init = the reference, 1/λ = 2: −0.9 − 1 + 1.2 = −0.7, −1.1 + 1 + 0.8 = 0.7 → 0.49.
    _, m = actor_critic_loss(LossConfig(apa_anchor="init", apa_inv_lambda=2.0), "apa", logp, ent, values, batch)
    assert float(m["policy_loss"]) == pytest.approx(0.49, rel=1e-6) and float(m["policy_weight"]) == 1.0


def test_critic_warmup_gate_blocks_policy_gradient():
    batch = _experience()
    logp, ent = jnp.array([[-0.9, -1.1, 0.0]]), jnp.zeros((1, 3))
    cfg = LossConfig(critic_warmup_threshold=1.0)

    def grads(values):
        return jax.grad(lambda lp, v: actor_critic_loss(cfg, "apa", lp, ent, v, batch)[0], argnums=(0, 1))(logp, values)

    bad_values = jnp.array([[3.0, -3.0, 0.0]])  # value loss ½·(2.5² + 2.5²)/2 = 3.125 > 1: only the critic trains
    g_logp, g_v = grads(bad_values)
    assert np.all(np.asarray(g_logp) == 0) and np.any(np.asarray(g_v) != 0)
    good_values = jnp.array([[0.4, -0.4, 0.0]])
    g_logp, _ = grads(good_values)
    assert np.any(np.asarray(g_logp) != 0)
    assert float(critic_warmup_gate(jnp.float32(5.0), 0.0)) == 1.0  # τ = 0: gate off


def test_loss_config_errors():
    with pytest.raises(ConfigError, match="algorithm"):
        actor_critic_loss(LossConfig(), "dpo", *(jnp.zeros((1, 3)),) * 3, _experience())
    with pytest.raises(ConfigError, match="apa_anchor"):
        LossConfig(apa_anchor="ref")
