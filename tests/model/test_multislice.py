"""The `dcn` mesh axis (multi-slice data parallelism) on 8 simulated CPU devices: its layout rules, and a train step
on a (dcn=2, data=1, fsdp=2, tensor=2) mesh equals one device's. (TPU slices: tests/test_aot_tpu.py.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from starling_jax.errors import ConfigError
from starling_jax.model.config import ModelConfig
from starling_jax.model.create import abstract_model, create_sharded
from starling_jax.parallel import sharding
from starling_jax.train import rm_step
from starling_jax.train.optimizer import OptimConfig, make_optimizer
from starling_jax.train.state import init_train_state

CFG = ModelConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=None,
)


def test_dcn_axis_is_outermost_and_replicates_parameters():
    mesh = sharding.make_mesh(sharding.MeshConfig(dcn=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 2, "tensor": 2}
    # consecutive device blocks are the slices: the first half of the devices is slice 0
    assert [d.id for d in mesh.devices[0].ravel()] == [d.id for d in jax.devices()[:4]]
    assert sharding.data_parallel_size(mesh) == 4
    assert sharding.batch_sharding(mesh, 3).spec == P(("dcn", "fsdp"), None, None)
    assert sharding.logical_to_spec(("embed", "mlp"), (32, 64), mesh) == P("fsdp", "tensor")  # never over dcn
    # one slice: no dcn axis at all, the same layout as before
    single = sharding.make_mesh(sharding.MeshConfig())
    assert dict(single.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert sharding.batch_sharding(single, 2).spec == P("fsdp", None)


def test_dcn_errors_name_the_key():
    with pytest.raises(ConfigError, match="mesh.dcn=3"):
        sharding.make_mesh(sharding.MeshConfig(dcn=3))
    with pytest.raises(ConfigError, match="mesh.dcn=0"):
        sharding.MeshConfig(dcn=0)


def make_batch(b=8, k=3, length=16, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, length + 1, (b, k))
    seg = (np.arange(length)[None, None] < lengths[..., None]).astype(np.int32)
    tokens = rng.integers(1, CFG.vocab_size, (b, k, length)).astype(np.int32) * seg
    return {
        "tokens": tokens,
        "positions": (np.arange(length)[None, None] * seg).astype(np.int32),
        "segment_ids": seg,
        "reward_index": (lengths - 1).astype(np.int32),
        "ranks": np.stack([rng.permutation(k) + 1 for _ in range(b)]).astype(np.float32),
        "answer_mask": np.ones((b, k), bool),
    }


def train_losses(mesh_cfg, devices, steps=2):
    mesh = sharding.make_mesh(mesh_cfg, devices=devices)
    graphdef, params = create_sharded(CFG, "reward", mesh, seed=0)
    _, abstract = abstract_model(CFG, "reward")
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2), 10)
    state, shardings = init_train_state(params, sharding.state_shardings(abstract, mesh), tx, mesh, seed=0)
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in make_batch().items()}
    step = rm_step.jit_train_step(graphdef, tx, schedule, rm_step.LossConfig(), 1, mesh, shardings, batch_sh)
    losses = []
    for i in range(steps):
        batch = {k: jax.device_put(v, batch_sh[k]) for k, v in make_batch(seed=i).items()}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state


def test_train_step_on_a_dcn_mesh_equals_one_device():
    one, _ = train_losses(sharding.MeshConfig(), jax.devices()[:1])
    multi, state = train_losses(sharding.MeshConfig(dcn=2, fsdp=2, tensor=2), jax.devices())
    np.testing.assert_allclose(multi, one, rtol=0, atol=1e-5)
    assert np.ptp(one) > 1e-3  # the losses move: not a comparison of constants
    specs = [str(x.sharding.spec) for x in jax.tree.leaves(state["params"])]
    assert any("fsdp" in s for s in specs) and not any("dcn" in s for s in specs)  # replicated across slices
