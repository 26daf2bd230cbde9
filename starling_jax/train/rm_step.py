"""The reward-model train and eval steps (module-level pure functions; `jit_*` builders add shardings).

One step scores all K answers of every prompt in one forward pass ([B, K, L] → [B·K, L] sequences), applies the
selected ranking loss, and makes one optimizer update, optionally accumulating gradients over micro-batches.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from starling_jax.data.batch_spec import kwise_specs
from starling_jax.errors import ConfigError
from starling_jax.losses.ranking import RANKING_LOSSES, get_ranking_loss, reward_centering_loss
from starling_jax.model.heads import kwise_rewards
from starling_jax.parallel import sharding
from starling_jax.train.state import TrainState
from starling_jax.train.step import accumulate_gradients, apply_update


@dataclasses.dataclass
class LossConfig:
    name: str = "kwise"  # kwise (Plackett-Luce MLE, Starling's choice) | pairwise (Bradley-Terry over all pairs)
    margin_scale: float = 0.0  # pairwise only: margin = margin_scale × rank gap
    centering_coef: float = 0.0  # × mean(reward)² per prompt; pins the free reward offset

    def __post_init__(self):
        if self.name not in RANKING_LOSSES:
            raise ConfigError(f"loss.name={self.name!r}: choose one of {sorted(RANKING_LOSSES)}")
        if self.margin_scale and self.name != "pairwise":
            raise ConfigError("loss.margin_scale applies only to loss.name=pairwise")


def rm_loss(params: nnx.State, graphdef: nnx.GraphDef, batch: dict, loss_cfg: LossConfig):
    """→ (loss summed over valid prompts, (num valid prompts, rewards [B, K])).

    Summed, not averaged, so that micro-batches add up to exactly the full-batch mean.
    """
    model = nnx.merge(graphdef, params)
    rewards = kwise_rewards(model, batch)
    kwargs = {"margin_scale": loss_cfg.margin_scale} if loss_cfg.name == "pairwise" else {}
    loss, aux = get_ranking_loss(loss_cfg.name)(rewards, batch["ranks"], batch["answer_mask"], **kwargs)
    count = aux["num_valid_prompts"].astype(jnp.float32)
    total = loss * count
    if loss_cfg.centering_coef:
        total = total + loss_cfg.centering_coef * reward_centering_loss(rewards, batch["answer_mask"]) * count
    return total, (count, rewards)


def train_step(
    state: TrainState,
    batch: dict,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_cfg: LossConfig,
    micro_batches: int = 1,
    mesh: Mesh | None = None,
    grad_mask=None,
    max_grad_norm: float = 0.0,
) -> tuple[TrainState, dict]:
    """One optimizer update (`step.apply_update`: a non-finite loss or gradient leaves the state untouched and is
    reported in `metrics["finite"]`; the loop then stops or, with `train.skip_nonfinite`, skips the batch)."""
    with sharding.activation_sharding(mesh):
        batch = train_spec(batch).select(batch)
        loss_sum, count, grads, rewards = accumulate_gradients(
            functools.partial(_rm_loss_of, graphdef=graphdef, loss_cfg=loss_cfg), state["params"], batch, micro_batches
        )
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        new_state, metrics = apply_update(
            state, grads, loss_sum / denom, tx=tx, schedule=schedule, grad_mask=grad_mask, max_grad_norm=max_grad_norm
        )
        metrics["num_prompts"] = count
        metrics["batch_pairwise_accuracy"] = batch_pairwise_accuracy(rewards, batch["ranks"], batch["answer_mask"])
        return new_state, metrics


def train_spec(batch: dict):
    """The train-step spec matching `batch`: packed rows carry `reward_row`."""
    return kwise_specs("reward_row" in batch)[0]


def _rm_loss_of(params, batch, *, graphdef, loss_cfg):
    return rm_loss(params, graphdef, batch, loss_cfg)  # looked up at trace time (tests patch it)


def batch_pairwise_accuracy(rewards, ranks, answer_mask):
    """Fraction of strictly ordered answer pairs whose rewards agree with the ranks (reward ties count ½)."""
    better = (ranks[:, :, None] < ranks[:, None, :]) & answer_mask[:, :, None] & answer_mask[:, None, :]
    diff = rewards[:, :, None] - rewards[:, None, :]
    score = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))
    return jnp.sum(score * better) / jnp.maximum(jnp.sum(better), 1)


def eval_rewards(params: nnx.State, batch: dict, *, graphdef: nnx.GraphDef, mesh: Mesh | None = None):
    """rewards [B, K] for a K-wise batch (masked answers included; callers mask them)."""
    with sharding.activation_sharding(mesh):
        return kwise_rewards(nnx.merge(graphdef, params), batch)


def jit_train_step(
    graphdef,
    tx,
    schedule,
    loss_cfg: LossConfig,
    micro_batches: int,
    mesh: Mesh,
    state_shardings: TrainState,
    batch_shardings: dict,
    grad_mask=None,
    max_grad_norm: float = 0.0,
):
    fn = functools.partial(
        train_step,
        graphdef=graphdef,
        tx=tx,
        schedule=schedule,
        loss_cfg=loss_cfg,
        micro_batches=micro_batches,
        mesh=mesh,
        grad_mask=grad_mask,
        max_grad_norm=max_grad_norm,
    )
    return jax.jit(
        fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
