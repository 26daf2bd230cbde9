"""Experience layout (left-padded prompt + completion) against per-row right-padded forwards; the frozen-bottom
update forward against the plain one; make_experience against its formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from starling_jax.model.config import ModelConfig
from starling_jax.model.hydra import ReferenceTop
from starling_jax.rl import advantages, kl, rewards
from starling_jax.rl.experience import AdvantageConfig, make_experience, minibatch_loss, rollout_forward
from starling_jax.rl.losses import LossConfig
from tests.rl.fixtures import tiny_model

CFG = ModelConfig(
    model_type="mistral",
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=6,
)
P, T = 5, 4


def rollout_batch():
    """Two rows: prompts of 5 and 2 tokens (left-padded to P), completions of 4 and 2 tokens (right-padded)."""
    prompts, completions = [[3, 4, 5, 6, 7], [9, 10]], [[11, 12, 13, 14], [15, 16]]
    tokens = np.zeros((2, P + T), np.int32)
    segment_ids = np.zeros((2, P + T), np.int32)
    positions = np.zeros((2, P + T), np.int32)
    mask = np.zeros((2, T), np.float32)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        tokens[r, P - len(p) : P] = p
        tokens[r, P : P + len(c)] = c
        segment_ids[r, P - len(p) : P + len(c)] = 1
        positions[r, P - len(p) : P + len(c)] = np.arange(len(p) + len(c))
        mask[r, : len(c)] = 1
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "mask": mask}, prompts, completions


@pytest.fixture(scope="module")
def models():
    return tiny_model(CFG, "causal_lm", seed=0), tiny_model(CFG, "reward", seed=1)


def test_left_padded_layout_equals_right_padded_rows(models):
    actor, critic = models
    batch, prompts, completions = rollout_batch()
    reference = ReferenceTop(actor, 1)
    out = nnx.jit(lambda a, r, c: rollout_forward(a, r, c, batch, P, hydra=True))(actor, reference, critic)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        seq = jnp.asarray([p + c], jnp.int32)
        n = len(p) + len(c)
        logits = actor(seq, jnp.arange(n)[None], jnp.ones((1, n), jnp.int32))
        logp = jax.nn.log_softmax(logits[0, len(p) - 1 : n - 1])
        want = np.asarray(logp[jnp.arange(len(c)), jnp.asarray(c)])
        np.testing.assert_allclose(np.asarray(out["logprobs"][r, : len(c)]), want, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out["ref_logprobs"][r, : len(c)]), want, atol=1e-5)  # ref = actor now
        values = critic(seq, jnp.arange(n)[None], jnp.ones((1, n), jnp.int32))[0, len(p) - 1 : n - 1]
        np.testing.assert_allclose(np.asarray(out["values"][r, : len(c)]), np.asarray(values), atol=1e-5)


def test_make_experience_follows_its_formulas(models):
    actor, critic = models
    batch, _, _ = rollout_batch()
    forward = {
        "logprobs": jnp.array([[-1.0, -2.0, -0.5, -1.0], [-0.2, -0.3, 0.0, 0.0]]),
        "ref_logprobs": jnp.array([[-1.5, -1.0, -0.5, -2.0], [-0.2, -0.1, 0.0, 0.0]]),
        "values": jnp.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.0, 0.0]]),
        "entropy": jnp.ones((2, T)),
    }
    kl_cfg, reward_cfg = kl.KLConfig(coef=0.1), rewards.RewardConfig(normalize="none", clip=0.0)
    adv_cfg = AdvantageConfig(gamma=1.0, lam=0.95)
    exp, stats, metrics = make_experience(
        forward,
        jnp.asarray(batch["mask"]),
        jnp.array([2.0, -1.0]),
        jnp.array([True, True]),
        jnp.float32(0.1),
        rewards.init_reward_stats(),
        kl_cfg=kl_cfg,
        reward_cfg=reward_cfg,
        adv_cfg=adv_cfg,
    )
    k1 = np.array([[0.5, -1.0, 0.0, 1.0], [0.0, -0.2, 0.0, 0.0]])
    r = -0.1 * k1
    r[0, 3] += 2.0
    r[1, 1] += -1.0
    want_adv, want_ret = advantages.gae(jnp.asarray(r), forward["values"], batch["mask"], 1.0, 0.95)
    np.testing.assert_allclose(exp["advantages"], want_adv, atol=1e-6)
    np.testing.assert_allclose(exp["returns"], want_ret, atol=1e-6)
    assert float(metrics["kl"]) == pytest.approx((0.5 - 1.0 + 0.0 + 1.0 - 0.2) / 2, rel=1e-6)
    assert float(metrics["score_raw"]) == pytest.approx(0.5) and float(stats.count) == 2


def test_frozen_bottom_forward_same_loss_and_top_gradients(models):
    actor, critic = models
    batch, _, _ = rollout_batch()
    graphdefs = {"actor": nnx.graphdef(actor), "critic": nnx.graphdef(critic)}
    params = {"actor": nnx.state(actor), "critic": nnx.state(critic)}
    mb = {
        **{k: jnp.asarray(v) for k, v in batch.items()},
        "old_logprobs": jnp.full((2, T), -4.0),
        "ref_logprobs": jnp.full((2, T), -4.0),
        "old_values": jnp.zeros((2, T)),
        "advantages": jnp.array([[1.0, -1.0, 0.5, 0.2], [0.3, 0.1, 0.0, 0.0]]),
        "returns": jnp.ones((2, T)),
    }

    def run(frozen):
        fn = lambda p: minibatch_loss(
            p,
            mb,
            graphdefs=graphdefs,
            loss_cfg=LossConfig(),
            algorithm="ppo",  # noqa
            prompt_len=P,
            frozen_layers=frozen,
        )
        return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

    (loss_full, _), g_full = run(0)
    (loss_frozen, _), g_frozen = run(2)
    assert float(loss_full) == pytest.approx(float(loss_frozen), rel=1e-6)
    top = lambda g: jax.tree.leaves(g["actor"]["decoder"]["layers"][2])  # noqa: E731
    for a, b in zip(top(g_full), top(g_frozen)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g_frozen["actor"]["decoder"]["layers"][0]))


def test_rollout_forward_with_blockwise_attention_equals_einsum(models):
    """`runtime.attention_impl` reaches every RL forward (actor, hydra reference, critic): on the left-padded rollout
    layout blockwise attention (what `auto` picks on GPU; splash on TPU reads the same segment ids and positions)
    gives einsum's log-probs, reference log-probs and values, and so the same update loss."""
    batch, _, _ = rollout_batch()
    einsum_actor, einsum_critic = models
    outs = {}
    blockwise = CFG.replace(attention_impl="blockwise")
    for impl, actor, critic in (
        ("einsum", einsum_actor, einsum_critic),
        ("blockwise", tiny_model(blockwise, "causal_lm", seed=0), tiny_model(blockwise, "reward", seed=1)),
    ):
        assert actor.cfg.attention_impl == impl
        outs[impl] = nnx.jit(lambda a, r, c: rollout_forward(a, r, c, batch, P, hydra=True))(
            actor, ReferenceTop(actor, 1), critic
        )
    real = batch["mask"] > 0  # after a row's end the tokens are padding: their outputs are never read
    for key in ("logprobs", "ref_logprobs", "values"):
        np.testing.assert_allclose(
            np.asarray(outs["blockwise"][key])[real], np.asarray(outs["einsum"][key])[real], atol=2e-5, err_msg=key
        )
