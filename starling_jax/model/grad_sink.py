"""Gradients of the scanned decoder layers accumulated in place, inside the backward layer scan.

Gradient accumulation over micro-batches normally holds two full gradient buffers of the stacked layers: the
accumulator, and the micro-batch's gradient that the transposed layer scan stacks up ([layers, ...] per
parameter) before it is added. Under full remat the backward visits one layer at a time anyway, so it can add
that layer's gradient straight into the accumulator's slice: `scan_layers` is the layer scan with a custom VJP
that does exactly that (7B recipes on TPU: −0.8 GiB per chip, BENCHMARKS.md).

How the accumulator reaches the decoder without changing any model or loss signature: `train.step` traces the
loss inside `sink(params, acc)`, which maps each parameter leaf (the tracer itself) to its accumulator leaf. A
decoder whose stacked layer parameters are all in the map, and that runs under full remat with scanned layers,
`take`s them (once per trace: a second use of the same layers, or a frozen model's layers that are not in the
map, takes the ordinary path) and calls `scan_layers` with the accumulator as an extra input. Its custom VJP
returns, as the accumulator's "cotangent", acc + ∂loss/∂layers, and no cotangent for the layer parameters
themselves; `train.step` reads the new accumulator from there. The forward is the ordinary scan saving each
layer's input (what full remat saves); the backward re-runs each layer under `jax.vjp`, as full remat does, so
values and gradients are those of the ordinary path (`tests/model/test_grad_sink.py`). Owning the saved inputs
also lets it place them: split over the tensor-parallel devices while they wait (each would otherwise hold the
same copy of every layer's input), or in host memory (`full_offload`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from starling_jax.parallel.sharding import constrain

_local = threading.local()  # the active sinks of this thread's traces, innermost last
_HOST, _DEVICE = jax.memory.Space.Host, jax.memory.Space.Device


class Sink:
    """Parameter leaf (by identity) → accumulator leaf, for one trace of the loss; `taken` lists what was used."""

    def __init__(self, params, acc):
        self._acc = {id(p): a for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(acc))}
        self.taken: set[int] = set()

    def take(self, stacked: nnx.State):
        """The accumulator subtree for the stacked layer parameters `stacked`, or None (not all of them are
        parameters being differentiated, or they were taken already in this trace)."""
        ids = [id(leaf) for leaf in jax.tree.leaves(stacked)]
        if not ids or any(i not in self._acc or i in self.taken for i in ids):
            return None
        self.taken.update(ids)
        return jax.tree.unflatten(jax.tree.structure(stacked), [self._acc[i] for i in ids])


@contextlib.contextmanager
def sink(params, acc) -> Iterator[Sink]:
    """Within this block, decoders whose stacked layers are leaves of `params` accumulate those layers'
    gradients into the matching leaves of `acc` (same tree structure as `params`)."""
    s = Sink(params, acc)
    stack = _local.__dict__.setdefault("sinks", [])
    stack.append(s)
    try:
        yield s
    finally:
        stack.pop()


def take(stacked: nnx.State):
    """The innermost active sink's accumulator for `stacked` (see `Sink.take`), or None."""
    stack = getattr(_local, "sinks", None)
    return stack[-1].take(stacked) if stack else None


def scan_layers(
    apply_layer: Callable,
    graphdef: nnx.GraphDef,
    stacked: nnx.State,
    acc,
    x,
    context: Any,
    offload: bool = False,
    saved_axes: tuple | None = None,
    input_axes: tuple | None = None,
):
    """x → the layers applied in order (`apply_layer(layer, x, context)` with `layer = nnx.merge(graphdef,
    stacked[i])`), with the VJP described in the module doc: the accumulator `acc` (the stacked parameters'
    structure, any float dtype) gets acc + ∂/∂stacked; `stacked` gets no cotangent; `context` (positions, the
    attention mask) is not differentiated. `offload`: the saved layer inputs wait for the backward in host
    memory (`remat_policy=full_offload`). `saved_axes` / `input_axes`: logical axes (`parallel.sharding`) of a
    saved layer input while it waits, and of a layer's input when it runs: the decoder saves them split over the
    tensor-parallel devices, which otherwise each hold the same copy (gathered back one layer at a time)."""
    layout = (offload, saved_axes, input_axes)
    return _scan_layers(apply_layer, graphdef, layout, stacked, acc, x, context)


def _apply(apply_layer, graphdef, layer_state, x, context):
    return apply_layer(nnx.merge(graphdef, layer_state), x, context)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _scan_layers(apply_layer, graphdef, layout, stacked, acc, x, context):
    del acc
    body = lambda h, layer_state: (_apply(apply_layer, graphdef, layer_state, h, context), None)  # noqa: E731
    return jax.lax.scan(body, x, stacked)[0]


def _save(h, layout):
    offload, saved_axes, _ = layout
    h = h if saved_axes is None else constrain(h, saved_axes)
    return jax.device_put(h, _HOST) if offload else h


def _restore(h, layout):
    offload, _, input_axes = layout
    h = jax.device_put(h, _DEVICE) if offload else h
    return h if input_axes is None else constrain(h, input_axes)


def _forward(apply_layer, graphdef, layout, stacked, acc, x, context):
    def body(h, layer_state):
        return _apply(apply_layer, graphdef, layer_state, h, context), _save(h, layout)

    y, inputs = jax.lax.scan(body, x, stacked)  # inputs[i]: layer i's input, all full remat keeps
    return y, (stacked, acc, inputs, context)


def _backward(apply_layer, graphdef, layout, residuals, dy):
    stacked, acc, inputs, context = residuals
    num_layers = jax.tree.leaves(inputs)[0].shape[0]

    def body(carry, xs):
        dh, acc = carry
        layer_state, h, i = xs
        h = _restore(h, layout)
        _, layer_vjp = jax.vjp(lambda s, h: _apply(apply_layer, graphdef, s, h, context), layer_state, h)
        d_state, dh = layer_vjp(dh)
        # acc[i] += ∂/∂layer_i, written into the carried accumulator (updated in place: no stacked gradient)
        acc = jax.tree.map(
            lambda a, d: jax.lax.dynamic_update_index_in_dim(
                a, jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False) + d.astype(a.dtype), i, 0
            ),
            acc,
            d_state,
        )
        return (dh, acc), None

    (dx, acc), _ = jax.lax.scan(body, (dy, acc), (stacked, inputs, jnp.arange(num_layers)), reverse=True)
    return None, acc, dx, None


_scan_layers.defvjp(_forward, _backward)
