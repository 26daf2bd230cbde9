"""The train state: a pytree of global arrays, sharded by the rules table, donated to the step, checkpointed whole.

  step       int32 []            optimizer updates applied
  params     nnx.State           the trainable model's parameters (Variables carry their logical axes)
  opt_state  optax state         mirrors params where it holds moments (sharded like them), else replicated
  rng        uint32 [2]          key data for anything stochastic; split once per applied update by the step
                                 (`step.apply_update`): state["rng"] ← split(rng)[0], the step uses split(rng)[1]

Several models: a job names every model it holds (`ModelEntry`: name, role, architecture, trainable). Trainable
models live in the donated state (a job with more than one puts them under `params`/`opt_state` by name); frozen
ones (a reference policy, a reward model; bf16-able) live outside it in a `{name: params}` dict that the step
reads but never donates. Checkpoints store both and restore each model by name (`ckpt/manager.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from starling_jax.model.config import ModelConfig
from starling_jax.parallel import sharding

TrainState = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A model a job holds, as its checkpoint metadata names it."""

    name: str  # "reward", "policy", "reference", ...
    role: str  # a key of model.heads.ROLES
    config: ModelConfig
    trainable: bool

    def meta(self) -> dict:
        return {
            "role": self.role,
            "trainable": self.trainable,
            "architecture": self.config.architecture_dict(),
            "model": dataclasses.asdict(self.config),
        }


def state_shardings(
    params_shardings: nnx.State, tx: optax.GradientTransformation, params: nnx.State, mesh: Mesh
) -> TrainState:
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, params_shardings, transform_non_params=lambda _: sharding.replicated(mesh)
    )
    rep = sharding.replicated(mesh)
    return {"step": rep, "params": params_shardings, "opt_state": opt_shardings, "rng": rep}


def init_train_state(
    params: nnx.State, params_shardings: nnx.State, tx: optax.GradientTransformation, mesh: Mesh, seed: int
) -> tuple[TrainState, TrainState]:
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


def abstract_params(params: nnx.State, shardings: nnx.State) -> nnx.State:
    """ShapeDtypeStructs with shardings of a frozen model's params (its restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)


def state_shapes(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
    """The train state's shapes from (abstract) params alone: what `aot` compiles against."""
    return {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": params,
        "opt_state": jax.eval_shape(tx.init, params),
        "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
    }
