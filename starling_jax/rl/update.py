"""The jitted RL programs: the rollout forward + experience, and one donated actor-critic update per minibatch.

RL state (a pytree of global arrays, donated to the update, checkpointed whole):

  step        int32 []        optimizer updates applied
  iteration   int32 []        rollout iterations done (the sampling keys of the next one are folded from it)
  params      {"actor": nnx.State, "critic": nnx.State}   the trainable models (grpo / rloo: {"actor"} only, no
              critic is built, trained or checkpointed)
  opt_state   optax state of them (one AdamW over the pair, as trlx; frozen layers masked by the optimizer)
  rng         uint32 [2]      key data: minibatch order and sampling keys are folded from it
  kl_coef     float32 []      β of the KL controller
  reward_stats {count, mean, m2, ref_std} float32 []: running moments of the clipped RM scores
              (`rewards.RewardStats` fields)

Frozen models (reference: a hydra `ReferenceTop` or a full copy; reward model) live outside the donated state.
Batch axis B is sharded over the data-parallel mesh axes; every loss is a masked mean over the global batch, so
one device and N devices compute the same numbers.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from starling_jax.parallel import sharding
from starling_jax.rl.experience import minibatch_loss
from starling_jax.rl.losses import CRITIC_FREE, LossConfig
from starling_jax.rl.rewards import init_reward_stats

RLState = dict[str, Any]
EXPERIENCE_KEYS = (
    "tokens",
    "positions",
    "segment_ids",
    "old_logprobs",
    "ref_logprobs",
    "old_values",
    "advantages",
    "returns",
    "mask",
)
CRITIC_KEYS = ("old_values", "returns")  # what only a critic's loss reads


def experience_keys(algorithm: str) -> tuple[str, ...]:
    """The minibatch arrays `algorithm`'s update reads (grpo / rloo: no old_values, returns)."""
    return tuple(k for k in EXPERIENCE_KEYS if algorithm not in CRITIC_FREE or k not in CRITIC_KEYS)


def update_step(
    state: RLState,
    minibatch: dict,
    *,
    graphdefs: dict,
    loss_cfg: LossConfig,
    algorithm: str,
    tx: optax.GradientTransformation,
    prompt_len: int,
    frozen_layers: int = 0,
    mesh: Mesh | None = None,
    kl_in_loss: bool = False,
) -> tuple[RLState, dict]:
    """One optimizer update of actor and critic (grpo / rloo: the actor) on a minibatch of experience. A non-finite
    loss or gradient leaves the state untouched (reported in metrics["finite"]). `kl_in_loss`: β·k3 (β the state's
    kl_coef) joins the loss."""
    with sharding.activation_sharding(mesh):
        loss_fn = functools.partial(
            minibatch_loss,
            graphdefs=graphdefs,
            loss_cfg=loss_cfg,
            algorithm=algorithm,
            prompt_len=prompt_len,
            frozen_layers=frozen_layers,
            kl_coef=state["kl_coef"],
            kl_in_loss=kl_in_loss,
        )
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], minibatch)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {
            **state,
            "step": state["step"] + finite.astype(jnp.int32),
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
        }
        return new_state, {**metrics, "grad_norm": grad_norm, "finite": finite}


def jit_update_step(
    graphdefs: dict,
    loss_cfg: LossConfig,
    algorithm: str,
    tx: optax.GradientTransformation,
    prompt_len: int,
    mesh: Mesh,
    state_shardings: RLState,
    frozen_layers: int = 0,
    kl_in_loss: bool = False,
):
    """`update_step` jitted: state donated and kept in its shardings, the minibatch sharded over its rows."""
    fn = functools.partial(
        update_step,
        graphdefs=graphdefs,
        loss_cfg=loss_cfg,
        algorithm=algorithm,
        tx=tx,
        prompt_len=prompt_len,
        frozen_layers=frozen_layers,
        mesh=mesh,
        kl_in_loss=kl_in_loss,
    )
    batch = {k: sharding.batch_sharding(mesh, 2) for k in experience_keys(algorithm)}
    return jax.jit(
        fn,
        in_shardings=(state_shardings, batch),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def minibatch_indices(key: jax.Array, num_rows: int, minibatch_size: int, epochs: int) -> jax.Array:
    """[epochs, num_rows // minibatch_size, minibatch_size] row indices: a fresh permutation per epoch."""
    keys = jax.random.split(key, epochs)
    perms = jax.vmap(lambda k: jax.random.permutation(k, num_rows))(keys)
    return perms[:, : (num_rows // minibatch_size) * minibatch_size].reshape(epochs, -1, minibatch_size)


def init_rl_state(
    params: dict, params_shardings: dict, tx: optax.GradientTransformation, mesh: Mesh, seed: int, kl_coef: float
) -> tuple[RLState, RLState]:
    """→ (state, shardings) with the optimizer state created in its shards."""
    abstract_opt = jax.eval_shape(tx.init, params)
    rep = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, params_shardings, transform_non_params=lambda _: rep
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    stats = dict(init_reward_stats()._asdict())  # a plain dict: restores from a checkpoint as it was saved
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), rep),
        "iteration": jax.device_put(jnp.zeros((), jnp.int32), rep),
        "params": params,
        "opt_state": opt_state,
        "rng": jax.device_put(jax.random.key_data(jax.random.key(seed)), rep),
        "kl_coef": jax.device_put(jnp.float32(kl_coef), rep),
        "reward_stats": jax.device_put(stats, rep),
    }
    shardings = {
        "step": rep,
        "iteration": rep,
        "params": params_shardings,
        "opt_state": opt_shardings,
        "rng": rep,
        "kl_coef": rep,
        "reward_stats": jax.tree.map(lambda _: rep, stats),
    }
    return state, shardings


def params_and_shardings(models: dict[str, nnx.Module], mesh: Mesh) -> tuple[dict, dict]:
    """Modules → ({name: state placed in its shards}, {name: shardings}) by the logical-axis rules."""
    params, shardings = {}, {}
    for name, module in models.items():
        state = nnx.state(module)
        shardings[name] = sharding.state_shardings(state, mesh)
        params[name] = jax.device_put(state, shardings[name])
    return params, shardings
