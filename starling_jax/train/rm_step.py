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

from starling_jax.errors import ConfigError
from starling_jax.losses.ranking import RANKING_LOSSES, get_ranking_loss, reward_centering_loss
from starling_jax.model.heads import kwise_rewards
from starling_jax.parallel import sharding
from starling_jax.train.state import TrainState

BATCH_KEYS = ("tokens", "positions", "segment_ids", "reward_index", "ranks", "answer_mask")
PACKED_KEYS = ("reward_row",)  # packed / shared-prefix batches (data/layout.py) also carry these


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


def _split_micro_batches(batch: dict, micro_batches: int) -> dict:
    """[B, ...] → [M, B/M, ...] taking rows m, m+M, m+2M, ... for micro-batch m, so that each micro-batch
    stays spread over every data-parallel device (a plain reshape would put micro-batch m on 1/M of them)."""

    def split(x):
        b = x.shape[0]
        return jnp.moveaxis(x.reshape((b // micro_batches, micro_batches) + x.shape[1:]), 1, 0)

    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               schedule: optax.Schedule, loss_cfg: LossConfig, micro_batches: int = 1,
               mesh: Mesh | None = None) -> tuple[TrainState, dict]:
    """One optimizer update. A non-finite loss or gradient leaves params and optimizer state untouched and is
    reported in `metrics["finite"]` (the loop then stops before anything reaches a checkpoint)."""
    with sharding.activation_sharding(mesh):
        batch = {k: batch[k] for k in BATCH_KEYS + PACKED_KEYS if k in batch}
        grad_fn = jax.value_and_grad(rm_loss, has_aux=True)
        params = state["params"]
        if micro_batches == 1:
            (loss_sum, (count, rewards)), grads = grad_fn(params, graphdef, batch, loss_cfg)
        else:
            micro = _split_micro_batches(batch, micro_batches)

            def accumulate(carry, mb):
                (l, (c, r)), g = grad_fn(params, graphdef, mb, loss_cfg)
                acc_l, acc_c, acc_g = carry
                return (acc_l + l, acc_c + c, jax.tree.map(jnp.add, acc_g, g)), r

            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss_sum, count, grads), rewards = jax.lax.scan(accumulate, (0.0, 0.0, zeros), micro)
            rewards = jnp.moveaxis(rewards, 0, 1).reshape(batch["ranks"].shape)  # undo the interleaving
        denom = jnp.maximum(count, 1.0)
        loss = loss_sum / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {
            "step": state["step"] + finite.astype(jnp.int32),
            "params": keep(new_params, params),
            "opt_state": keep(new_opt_state, state["opt_state"]),
            "rng": state["rng"],
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
            "finite": finite,
            "num_prompts": count,
            "batch_pairwise_accuracy": batch_pairwise_accuracy(rewards, batch["ranks"], batch["answer_mask"]),
        }
        return new_state, metrics


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


def jit_train_step(graphdef, tx, schedule, loss_cfg: LossConfig, micro_batches: int, mesh: Mesh,
                   state_shardings: TrainState, batch_shardings: dict):
    fn = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, loss_cfg=loss_cfg,
                           micro_batches=micro_batches, mesh=mesh)
    return jax.jit(fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def jit_eval_rewards(graphdef, mesh: Mesh, params_shardings, batch_shardings: dict):
    fn = functools.partial(eval_rewards, graphdef=graphdef, mesh=mesh)
    return jax.jit(fn, in_shardings=(params_shardings, batch_shardings), out_shardings=sharding.replicated(mesh))
