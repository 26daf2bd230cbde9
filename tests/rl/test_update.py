"""The jitted, donated actor-critic update: 8 simulated devices give the same losses and parameters as one."""

import jax
import numpy as np
import optax
from flax import nnx

from starling_jax.model.config import ModelConfig
from starling_jax.parallel import sharding
from starling_jax.rl.losses import LossConfig
from starling_jax.rl.update import jit_update_step, minibatch_indices, params_and_shardings, rl_extra_state
from starling_jax.train.state import build_train_state
from tests.rl.fixtures import tiny_model

CFG = ModelConfig(
    model_type="mistral",
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
P, T, B = 4, 4, 8


def experience(seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, B)
    prompt_lengths = rng.integers(1, P + 1, B)
    tokens = np.zeros((B, P + T), np.int32)
    seg = np.zeros((B, P + T), np.int32)
    pos = np.zeros((B, P + T), np.int32)
    mask = np.zeros((B, T), np.float32)
    for r in range(B):
        n = prompt_lengths[r] + lengths[r]
        tokens[r, P - prompt_lengths[r] : P + lengths[r]] = rng.integers(1, 64, n)
        seg[r, P - prompt_lengths[r] : P + lengths[r]] = 1
        pos[r, P - prompt_lengths[r] : P + lengths[r]] = np.arange(n)
        mask[r, : lengths[r]] = 1
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return {
        "tokens": tokens,
        "positions": pos,
        "segment_ids": seg,
        "mask": mask,
        "old_logprobs": -4.2 + 0.1 * f(B, T),
        "ref_logprobs": -4.2 + 0.1 * f(B, T),
        "old_values": f(B, T),
        "advantages": f(B, T),
        "returns": f(B, T),
    }


def run(devices, algorithm):
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=devices)
    actor, critic = tiny_model(CFG, "causal_lm", 0), tiny_model(CFG, "reward", 1)
    graphdefs = {"actor": nnx.graphdef(actor), "critic": nnx.graphdef(critic)}
    params, shardings = params_and_shardings({"actor": actor, "critic": critic}, mesh)
    tx = optax.adamw(1e-3)
    state, state_shardings = build_train_state(params, shardings, tx, mesh, seed=0, extra=rl_extra_state(0.01))
    step = jit_update_step(
        graphdefs,
        LossConfig(critic_warmup_threshold=0.0),
        algorithm,
        tx,
        optax.constant_schedule(1e-3),
        P,
        mesh,
        state_shardings,
        frozen_layers=1,
    )
    batch = experience()
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"])


def test_eight_devices_equal_one():
    # APA differs only in its loss function (tested by hand values in test_losses): PPO alone here.
    one_losses, one_params = run(jax.devices()[:1], "ppo")
    eight_losses, eight_params = run(jax.devices()[:8], "ppo")
    np.testing.assert_allclose(eight_losses, one_losses, rtol=2e-5, atol=1e-6)
    assert one_losses[2] < one_losses[0]  # the updates do something
    for a, b in zip(jax.tree.leaves(one_params), jax.tree.leaves(eight_params)):
        # Adam normalizes each step to ~lr = 1e-3 whatever the gradient's size, so fp reduction-order noise in a
        # near-zero gradient moves a weight by up to a few % of lr (CI, -O0: 1.4e-5 on 1 of 4096); a wrong
        # data-parallel gradient flips signs and moves many weights by ~2 lr.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_minibatch_indices_are_permutations():
    idx = np.asarray(minibatch_indices(jax.random.key(0), 10, 4, 3))
    assert idx.shape == (3, 2, 4)
    for epoch in idx:
        assert len(set(epoch.reshape(-1).tolist())) == 8
    assert not np.array_equal(idx[0], idx[1])
