"""The train state: a pytree of global arrays, sharded by the rules table, checkpointed whole.

  step       int32 []            optimizer updates applied
  params     nnx.State           model parameters (Variables carry their logical axes)
  opt_state  optax state         mirrors params where it holds moments (sharded like them), else replicated
  rng        uint32 [2]          key data for anything stochastic (dropout, sampling); advanced by the loop
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from starling_jax.parallel import sharding

TrainState = dict[str, Any]


def state_shardings(params_shardings: nnx.State, tx: optax.GradientTransformation, params: nnx.State,
                    mesh: Mesh) -> TrainState:
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, params_shardings,
        transform_non_params=lambda _: sharding.replicated(mesh))
    rep = sharding.replicated(mesh)
    return {"step": rep, "params": params_shardings, "opt_state": opt_shardings, "rng": rep}


def init_train_state(params: nnx.State, params_shardings: nnx.State, tx: optax.GradientTransformation,
                     mesh: Mesh, seed: int) -> tuple[TrainState, TrainState]:
    """Optimizer state created directly in its shards; returns (state, shardings)."""
    shardings = state_shardings(params_shardings, tx, params, mesh)
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    rep = sharding.replicated(mesh)
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), rep),
        "params": params,
        "opt_state": opt_state,
        "rng": jax.device_put(jax.random.key_data(jax.random.key(seed)), rep),
    }
    return state, shardings


def abstract_train_state(state_or_shapes: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for Orbax."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_or_shapes, shardings)
