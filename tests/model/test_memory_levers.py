"""The memory levers change no result: `model.mlp_chunks` (the MLP over slices of the sequence, each under remat)
and `remat_policy=full_offload` (layer inputs in host memory between forward and backward) give the same rewards
and gradients as the whole MLP under plain `full` remat (one device and sharded), and shrink the compiled
backward's device temporaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from starling_jax.errors import ConfigError
from starling_jax.model import create
from starling_jax.model.config import ModelConfig
from starling_jax.model.heads import build_model
from starling_jax.parallel import sharding
from starling_jax.parallel.sharding import MeshConfig, make_mesh

BASE = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=7,
    pad_token_id=0,
    remat_policy="full",
    scan_layers=True,
)


def packed_batch(n: int, length: int, seed: int = 0):
    """Two segments per row, then padding: positions restart per segment."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 256, (n, length)).astype(np.int32)
    first, second = length // 3, length - length // 3 - 2
    seg = np.zeros((n, length), np.int32)
    seg[:, :first], seg[:, first:second] = 1, 2
    pos = np.where(seg == 1, np.arange(length), np.arange(length) - first) * (seg > 0)
    return jnp.asarray(np.where(seg > 0, tokens, 0)), jnp.asarray(pos, jnp.int32), jnp.asarray(seg)


def rewards_and_grads(cfg: ModelConfig, batch, mesh=None):
    if mesh is None:
        graphdef, params = nnx.split(build_model(cfg, "reward", seed=1))
    else:  # parameters in their shards (fsdp × tensor), as a run creates them
        graphdef, params = create.create_sharded(cfg, "reward", mesh, seed=1)
    tokens, positions, segment_ids = batch
    weights = jnp.linspace(-1.0, 1.0, tokens.shape[1])

    def loss(p):
        scores = nnx.merge(graphdef, p)(tokens, positions, segment_ids)  # [N, L]
        return jnp.sum(scores * weights * (segment_ids > 0)), scores

    with sharding.activation_sharding(mesh):
        (_, scores), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(scores), jax.tree.map(np.asarray, grads)


def assert_same(a, b):
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
    for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "remat_policy,scan_layers,length,chunks",
    [
        ("full", True, 24, 4),  # 4 slices of 6 tokens, under the scanned layers
        ("full", False, 30, 4),  # gcd(30, 4) = 2 slices
        ("none", False, 24, 8),  # no remat: the map keeps every slice's activations; same values
        ("full_offload", True, 24, 1),  # the scanned layers' inputs through pinned host memory
    ],
)
def test_chunked_mlp_equals_the_whole_mlp(remat_policy, scan_layers, length, chunks):
    cfg = BASE.replace(scan_layers=scan_layers)
    batch = packed_batch(3, length)
    assert_same(
        rewards_and_grads(cfg.replace(remat_policy=remat_policy, mlp_chunks=chunks), batch),
        rewards_and_grads(cfg, batch),
    )


def test_chunked_mlp_and_offload_sharded_equal_one_device():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    batch = packed_batch(4, 32, seed=2)
    assert_same(
        rewards_and_grads(BASE.replace(mlp_chunks=4, remat_policy="full_offload"), batch, mesh),
        rewards_and_grads(BASE, batch),
    )


def backward_temporaries(cfg: ModelConfig, n: int = 4, length: int = 512) -> int:
    graphdef, params = nnx.split(build_model(cfg, "reward", seed=0))
    tokens = jnp.ones((n, length), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length), (n, length))

    def loss(p):
        return nnx.merge(graphdef, p)(tokens, positions, jnp.ones_like(tokens)).sum()

    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes


def test_chunked_mlp_shrinks_the_backward_temporaries():
    """A wide MLP (F = 32·D) under full remat: its [N, L, F] activations dominate one layer's backward; 8 slices
    cut the compiled program's temporaries (XLA's own buffer assignment) by more than a third. (XLA:CPU counts
    host memory as device memory, so what `full_offload` moves off the device shows only in a TPU compile:
    `tests/test_aot_tpu.py`.)"""
    cfg = BASE.replace(intermediate_size=2048, sliding_window=None, num_hidden_layers=6)
    whole, chunked = backward_temporaries(cfg), backward_temporaries(cfg.replace(mlp_chunks=8))
    assert chunked < 0.6 * whole, (chunked, whole)


def test_mlp_chunks_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="model.mlp_chunks=0"):
        BASE.replace(mlp_chunks=0)
