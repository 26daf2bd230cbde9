"""The scanned layers' gradients accumulated in place (`model/grad_sink.py`, used by `train.step`'s gradient
accumulation under full remat), and the projections cast once before the layer scan (`decoder.cast_projections`):
both change no value or gradient, to the bit, against the ordinary layer scan and plain `jax.value_and_grad`;
the sink is not used where it must not be (other remat policies, a second use of the same layers, a frozen
model); and the accumulation no longer holds a stacked per-micro-batch gradient beside the accumulator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from starling_jax.model import create, decoder, grad_sink
from starling_jax.model.heads import build_model
from starling_jax.parallel import sharding
from starling_jax.parallel.sharding import MeshConfig, make_mesh
from starling_jax.train.step import accumulate_gradients
from tests.model.test_memory_levers import BASE, packed_batch

N, L = 4, 24
WEIGHTS = jnp.linspace(-1.0, 1.0, L)


def model_and_batch(cfg, mesh=None):
    if mesh is None:
        graphdef, params = nnx.split(build_model(cfg, "reward", seed=1))
    else:
        graphdef, params = create.create_sharded(cfg, "reward", mesh, seed=1)
    tokens, positions, segment_ids = packed_batch(N, L, seed=3)
    return graphdef, params, {"tokens": tokens, "positions": positions, "segment_ids": segment_ids}


def scores_loss(graphdef, uses: int = 1):
    """Σ scores · weights over real tokens, per micro-batch (summed, as the jobs' losses are); `uses` calls of the
    model on the same batch (the second with reversed weights)."""

    def loss_fn(p, b):
        model = nnx.merge(graphdef, p)
        total, scores = 0.0, None
        for u in range(uses):
            scores = model(b["tokens"], b["positions"], b["segment_ids"])
            total = total + jnp.sum(scores * (WEIGHTS if u == 0 else 1.0 + WEIGHTS**2) * (b["segment_ids"] > 0))
        return total, (jnp.float32(b["tokens"].shape[0]), scores)

    return loss_fn


class SinkCalls:
    """Counts the layer scans that went through the sink while tracing; `off()` disables the sink."""

    def __init__(self, monkeypatch):
        self.calls, self._mp = 0, monkeypatch
        scan = grad_sink.scan_layers

        def counted(*args, **kwargs):
            self.calls += 1
            return scan(*args, **kwargs)

        monkeypatch.setattr(grad_sink, "scan_layers", counted)

    def off(self):
        self._mp.setattr(grad_sink, "take", lambda stacked: None)


def accumulate(loss_fn, params, batch, micro_batches, mesh=None):
    with sharding.activation_sharding(mesh):
        out = jax.jit(lambda p, b: accumulate_gradients(loss_fn, p, b, micro_batches))(params, batch)
    return jax.tree.map(np.asarray, out)


def assert_bitwise(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "remat_policy,dtype,micro_batches",
    [("full", "float32", 1), ("full", "bfloat16", 4), ("full_offload", "float32", 2)],
)
def test_sink_gives_the_ordinary_sums_bit_for_bit(monkeypatch, remat_policy, dtype, micro_batches):
    cfg = BASE.replace(remat_policy=remat_policy, dtype=dtype, mlp_chunks=2)
    graphdef, params, batch = model_and_batch(cfg)
    sink = SinkCalls(monkeypatch)
    with_sink = accumulate(scores_loss(graphdef), params, batch, micro_batches)
    assert sink.calls == 1  # traced once: the micro-batch scan's body
    sink.off()
    assert_bitwise(with_sink, accumulate(scores_loss(graphdef), params, batch, micro_batches))
    # and against plain autodiff of the whole batch (sums, so micro-batches add up to it)
    (loss, _), grads = jax.jit(jax.value_and_grad(scores_loss(graphdef), has_aux=True))(params, batch)
    np.testing.assert_allclose(with_sink[0], loss, rtol=1e-5)
    tol = 1e-5 if dtype == "float32" else 2e-2
    for x, y in zip(jax.tree.leaves(with_sink[2]), jax.tree.leaves(grads)):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


def test_sharded_sink_equals_one_device(monkeypatch):
    cfg = BASE.replace(remat_policy="full", mlp_chunks=2)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    graphdef, params, batch = model_and_batch(cfg, mesh)
    sink = SinkCalls(monkeypatch)
    sharded = accumulate(scores_loss(graphdef), params, batch, 2, mesh)
    assert sink.calls == 1
    _, one_params, _ = model_and_batch(cfg)
    one = accumulate(scores_loss(graphdef), one_params, batch, 2)
    for x, y in zip(jax.tree.leaves(sharded), jax.tree.leaves(one)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_second_use_of_the_same_layers_takes_the_ordinary_path(monkeypatch):
    cfg = BASE.replace(remat_policy="full")
    graphdef, params, batch = model_and_batch(cfg)
    sink = SinkCalls(monkeypatch)
    got = accumulate(scores_loss(graphdef, uses=2), params, batch, 2)
    assert sink.calls == 1  # the first call; the second's gradient arrives through autodiff and is added
    (loss, _), grads = jax.jit(jax.value_and_grad(scores_loss(graphdef, uses=2), has_aux=True))(params, batch)
    np.testing.assert_allclose(got[0], loss, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(got[2]), jax.tree.leaves(grads)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_other_remat_policies_keep_the_ordinary_scan(monkeypatch):
    graphdef, params, batch = model_and_batch(BASE.replace(remat_policy="dots"))
    sink = SinkCalls(monkeypatch)
    accumulate(scores_loss(graphdef), params, batch, 2)
    assert sink.calls == 0


def test_a_frozen_models_layers_are_not_taken(monkeypatch):
    """A second model read but not differentiated (a frozen reference): its layers are not the sink's leaves."""
    cfg = BASE.replace(remat_policy="full")
    graphdef, params, batch = model_and_batch(cfg)
    _, frozen = nnx.split(build_model(cfg, "reward", seed=7))
    trained = scores_loss(graphdef)

    def loss_fn(p, b):
        total, aux = trained(p, b)
        ref = nnx.merge(graphdef, frozen)(b["tokens"], b["positions"], b["segment_ids"])
        return total + jnp.sum(ref * ref), aux

    sink = SinkCalls(monkeypatch)
    got = accumulate(loss_fn, params, batch, 2)
    assert sink.calls == 1  # the trained model only
    (_, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch)
    for x, y in zip(jax.tree.leaves(got[2]), jax.tree.leaves(grads)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_cast_projections_changes_nothing(monkeypatch):
    """bf16 compute, fp32 parameters: casting the stacked projections before the scan (so that the scan stacks
    their gradients in bf16) gives the same scores and gradients as casting at use, to the bit."""
    cfg = BASE.replace(dtype="bfloat16", mlp_chunks=2)
    graphdef, params, batch = model_and_batch(cfg)
    loss = jax.jit(jax.value_and_grad(scores_loss(graphdef), has_aux=True))
    cast = loss(params, batch)
    monkeypatch.setattr(decoder, "cast_projections", lambda stacked, dtype: stacked)
    assert_bitwise(cast, jax.jit(jax.value_and_grad(scores_loss(graphdef), has_aux=True))(params, batch))


def test_sink_drops_the_stacked_micro_batch_gradient(monkeypatch):
    """A wide layer stack, gradients accumulated over 2 micro-batches: without the sink the compiled step holds the
    stacked per-micro-batch gradient of every layer beside the accumulator; with it, about one layer's."""
    cfg = BASE.replace(
        remat_policy="full", hidden_size=256, intermediate_size=1024, num_hidden_layers=8, sliding_window=None
    )
    graphdef, params, batch = model_and_batch(cfg)

    def temporaries():
        fn = jax.jit(lambda p, b: accumulate_gradients(scores_loss(graphdef), p, b, 2))
        return fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    with_sink = temporaries()
    SinkCalls(monkeypatch).off()
    without = temporaries()
    layers_bytes = sum(
        x.nbytes for x in jax.tree.leaves(nnx.split(build_model(cfg, "reward", seed=1))[1]) if x.ndim >= 3
    )
    assert without - with_sink > 0.75 * layers_bytes, (with_sink, without, layers_bytes)


def test_saved_layer_inputs_are_split_over_the_tensor_parallel_devices(monkeypatch):
    """On a mesh with tensor=4, each saved layer input waits split over the 4 tensor-parallel devices (logical axis
    `act_saved_length`) instead of as 4 identical copies: the compiled step's per-device temporaries fall by at
    least ¾ of what 3 of those 4 copies hold (XLA's buffer assignment)."""
    cfg = BASE.replace(remat_policy="full", num_hidden_layers=8, sliding_window=None)
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    graphdef, params = create.create_sharded(cfg, "reward", mesh, seed=1)
    length = 256
    tokens, positions, segment_ids = packed_batch(4, length)
    batch = {"tokens": tokens, "positions": positions, "segment_ids": segment_ids}

    def loss_fn(p, b):
        scores = nnx.merge(graphdef, p)(b["tokens"], b["positions"], b["segment_ids"])
        return jnp.sum(scores * (b["segment_ids"] > 0)), (jnp.float32(1.0), scores)

    def temporaries():
        with sharding.activation_sharding(mesh):
            fn = jax.jit(lambda p, b: accumulate_gradients(loss_fn, p, b, 2))
            return fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    split = temporaries()
    monkeypatch.setitem(sharding.LOGICAL_RULES, "act_saved_length", None)
    whole = temporaries()
    # per device: 8 layers × 1 row (4 rows / 2 micro-batches / fsdp 2) × L × D fp32
    inputs = cfg.num_hidden_layers * 1 * length * cfg.hidden_size * 4
    assert whole - split >= 0.75 * inputs * 3 / 4, (split, whole, inputs)
