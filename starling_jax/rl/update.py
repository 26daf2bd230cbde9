"""The jitted RL programs: the rollout forward + experience, and one donated actor-critic update per minibatch.

RL state (the trainer's, `train.state.build_train_state` with `rl_extra_state`: a pytree of global arrays, donated
to the update, checkpointed whole):

  step        int32 []        optimizer updates applied
  iteration   int32 []        rollout iterations done
  params      {"actor": nnx.State, "critic": nnx.State}   the trainable models (grpo / rloo: {"actor"} only, no
              critic is built, trained or checkpointed)
  opt_state   optax state of them (one AdamW over the pair, as trlx; frozen layers masked by the optimizer)
  rng         uint32 [2]      key data, split once per applied update (`train.step.apply_update`); an
                              iteration's sampling and minibatch-order keys are folded from it
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
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from starling_jax.data.batch_spec import EXPERIENCE, EXPERIENCE_NO_CRITIC, BatchSpec
from starling_jax.parallel import sharding
from starling_jax.rl.experience import make_experience, minibatch_loss, rollout_forward
from starling_jax.rl.losses import CRITIC_FREE, LossConfig
from starling_jax.rl.rewards import RewardStats, init_reward_stats
from starling_jax.train.step import apply_update

RLState = dict[str, Any]
EXPERIENCE_KEYS = EXPERIENCE.names


def experience_spec(algorithm: str) -> BatchSpec:
    """The minibatch `algorithm`'s update reads (grpo / rloo: no old_values, returns)."""
    return EXPERIENCE_NO_CRITIC if algorithm in CRITIC_FREE else EXPERIENCE


def experience_keys(algorithm: str) -> tuple[str, ...]:
    return experience_spec(algorithm).names


def rl_extra_state(kl_coef: float) -> dict:
    """The RL state's leaves besides step / params / opt_state / rng (`state.build_train_state`'s `extra`)."""
    return {
        "iteration": np.int32(0),
        "kl_coef": np.float32(kl_coef),
        # a plain dict: restores from a checkpoint as it was saved
        "reward_stats": {k: np.float32(v) for k, v in init_reward_stats()._asdict().items()},
    }


def experience_step(
    params: dict,
    ref_params,
    rl_stats: dict,
    kl_coef,
    batch: dict,
    raw_scores,
    ended,
    *,
    graphdefs: dict,
    hydra: bool,
    cfg,
    reward_mean: float | None,
    reward_std: float | None,
    group_size: int = 1,
    mesh: Mesh | None = None,
):
    """The rollout forward (actor, reference, critic if any) and the experience of a `ROLLOUT` batch →
    (experience, new reward statistics, rollout metrics). `graphdefs`: actor, reference (and critic); `cfg`: the
    `PPORunConfig` (kl, reward, advantage, algorithm, prompts.max_prompt_tokens)."""
    with sharding.activation_sharding(mesh):
        actor = nnx.merge(graphdefs["actor"], params["actor"])
        critic = nnx.merge(graphdefs["critic"], params["critic"]) if "critic" in params else None
        reference = nnx.merge(graphdefs["reference"], ref_params)
        forward = rollout_forward(actor, reference, critic, batch, cfg.prompts.max_prompt_tokens, hydra)
        exp, stats, metrics = make_experience(
            forward,
            batch["mask"],
            raw_scores,
            ended,
            kl_coef,
            RewardStats(**rl_stats),
            kl_cfg=cfg.kl,
            reward_cfg=cfg.reward,
            adv_cfg=cfg.advantage,
            reward_mean=reward_mean,
            reward_std=reward_std,
            algorithm=cfg.algorithm,
            group_size=group_size,
            kl_in_loss=cfg.kl.in_loss,
        )
    return exp, dict(stats._asdict()), metrics


def jit_experience(**kwargs):
    """`experience_step` jitted with its keyword arguments fixed."""
    return jax.jit(functools.partial(experience_step, **kwargs))


def update_step(
    state: RLState,
    minibatch: dict,
    *,
    graphdefs: dict,
    loss_cfg: LossConfig,
    algorithm: str,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    prompt_len: int,
    frozen_layers: int = 0,
    mesh: Mesh | None = None,
    kl_in_loss: bool = False,
    grad_mask=None,
    max_grad_norm: float = 0.0,
) -> tuple[RLState, dict]:
    """One optimizer update of actor and critic (grpo / rloo: the actor) on a minibatch of experience, through the
    trainer's one guarded update (`train.step.apply_update`: a non-finite loss or gradient leaves the state
    untouched, reported in metrics["finite"]; the rng is split once per applied update; `learning_rate` and the
    gradient norm over trainable entries are reported). `kl_in_loss`: β·k3 (β the state's kl_coef) joins the
    loss."""
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
        new_state, update_metrics = apply_update(
            state, grads, loss, tx=tx, schedule=schedule, grad_mask=grad_mask, max_grad_norm=max_grad_norm
        )
        return new_state, {**metrics, **update_metrics}


def jit_update_step(
    graphdefs: dict,
    loss_cfg: LossConfig,
    algorithm: str,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    prompt_len: int,
    mesh: Mesh,
    state_shardings: RLState,
    frozen_layers: int = 0,
    kl_in_loss: bool = False,
    grad_mask=None,
    max_grad_norm: float = 0.0,
):
    """`update_step` jitted: state donated and kept in its shardings, the minibatch sharded over its rows."""
    fn = functools.partial(
        update_step,
        graphdefs=graphdefs,
        loss_cfg=loss_cfg,
        algorithm=algorithm,
        tx=tx,
        schedule=schedule,
        prompt_len=prompt_len,
        frozen_layers=frozen_layers,
        mesh=mesh,
        kl_in_loss=kl_in_loss,
        grad_mask=grad_mask,
        max_grad_norm=max_grad_norm,
    )
    return jax.jit(
        fn,
        in_shardings=(state_shardings, experience_spec(algorithm).shardings(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def minibatch_indices(key: jax.Array, num_rows: int, minibatch_size: int, epochs: int) -> jax.Array:
    """[epochs, num_rows // minibatch_size, minibatch_size] row indices: a fresh permutation per epoch."""
    keys = jax.random.split(key, epochs)
    perms = jax.vmap(lambda k: jax.random.permutation(k, num_rows))(keys)
    return perms[:, : (num_rows // minibatch_size) * minibatch_size].reshape(epochs, -1, minibatch_size)


def params_and_shardings(models: dict[str, nnx.Module], mesh: Mesh) -> tuple[dict, dict]:
    """Modules → ({name: state placed in its shards}, {name: shardings}) by the logical-axis rules."""
    params, shardings = {}, {}
    for name, module in models.items():
        state = nnx.state(module)
        shardings[name] = sharding.state_shardings(state, mesh)
        params[name] = jax.device_put(state, shardings[name])
    return params, shardings
