"""The train state: a pytree of global arrays, sharded by the rules table, donated to the step, checkpointed whole.

  step       int32 []            optimizer updates applied
  params     nnx.State           the trainable model's parameters (Variables carry their logical axes)
  opt_state  optax state         mirrors params where it holds moments (sharded like them), else replicated
  rng        uint32 [2]          key data for anything stochastic; split once per applied update by the step
                                 (`step.apply_update`): state["rng"] ← split(rng)[0], the step uses split(rng)[1]
  ...        a job's extra replicated leaves (RL: iteration, kl_coef, reward_stats)

One builder (`build_train_state`) makes it for every job, concrete or abstract (`aot`).

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


def is_abstract(tree) -> bool:
    """True when every leaf is a `ShapeDtypeStruct` (an abstract set-up: nothing allocated)."""
    return all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def build_train_state(
    params,
    params_shardings,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    seed: int = 0,
    extra: dict | None = None,
) -> tuple[TrainState, TrainState]:
    """The one state builder (every job's, and `aot`'s): → (state, shardings).

    `params`: the trainable model's `nnx.State`, or `{name: nnx.State}` for several trainable models (RL's actor
    and critic), with their shardings; one `tx` over all of them. `extra`: more replicated leaves a job carries
    (RL: `iteration`, `kl_coef`, `reward_stats`), as host values. Concrete params → the state allocated in its
    shards (optimizer state created there, never on one device); abstract params (`ShapeDtypeStruct`s) → the
    same state as `ShapeDtypeStruct`s with shardings, allocating nothing (what `aot` compiles against)."""
    rep = sharding.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, params_shardings, transform_non_params=lambda _: rep
    )
    extra = {k: jax.tree.map(jnp.asarray, v) for k, v in (extra or {}).items()}
    shardings = {
        "step": rep,
        "params": params_shardings,
        "opt_state": opt_shardings,
        "rng": rep,
        **{k: jax.tree.map(lambda _: rep, v) for k, v in extra.items()},
    }
    rng = jax.random.key_data(jax.random.key(seed))
    if is_abstract(params):
        shapes = {
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "params": params,
            "opt_state": abstract_opt,
            "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype),
            **{k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), v) for k, v in extra.items()},
        }
        return abstract_train_state(shapes, shardings), shardings
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), rep),
        "params": params,
        "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(params),
        "rng": jax.device_put(rng, rep),
        **jax.device_put(extra, rep),
    }
    return state, shardings


def init_train_state(
    params: nnx.State, params_shardings: nnx.State, tx: optax.GradientTransformation, mesh: Mesh, seed: int
) -> tuple[TrainState, TrainState]:
    """`build_train_state` of one trainable model without extra leaves."""
    return build_train_state(params, params_shardings, tx, mesh, seed)


def abstract_train_state(state_or_shapes: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for Orbax."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_or_shapes, shardings)


def abstract_params(params: nnx.State, shardings: nnx.State) -> nnx.State:
    """ShapeDtypeStructs with shardings of a frozen model's params (its restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
