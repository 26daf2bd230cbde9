"""The supervised (SFT) train and eval steps: next-token loss on the assistant's tokens of [B, L] batches."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from starling_jax.data.batch_spec import SFT_TRAIN
from starling_jax.losses.lm import masked_token_nll
from starling_jax.parallel import sharding
from starling_jax.train.state import TrainState
from starling_jax.train.step import accumulate_gradients, apply_update, split_micro_batches


def token_nll(params: nnx.State, graphdef: nnx.GraphDef, batch: dict) -> tuple[jax.Array, jax.Array]:
    """→ per-row (summed NLL of the masked next tokens [B], their count [B]) of a causal LM."""
    logits = nnx.merge(graphdef, params)(batch["tokens"], batch["positions"], batch["segment_ids"])
    return masked_token_nll(logits, batch["tokens"], batch["loss_mask"])


def sft_loss(params: nnx.State, batch: dict, *, graphdef: nnx.GraphDef):
    """→ (NLL summed over every predicted token, (token count, per-row NLL)); summed so micro-batches add up to
    the full-batch mean over tokens (not over rows)."""
    nll, count = token_nll(params, graphdef, batch)
    return nll.sum(), (count.sum(), nll)


def train_step(
    state: TrainState,
    batch: dict,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    micro_batches: int = 1,
    mesh: Mesh | None = None,
    grad_mask=None,
    max_grad_norm: float = 0.0,
) -> tuple[TrainState, dict]:
    """One optimizer update on the token-mean NLL (see `step.apply_update` for the non-finite guard)."""
    with sharding.activation_sharding(mesh):
        batch = SFT_TRAIN.select(batch)
        nll_sum, count, grads, _ = accumulate_gradients(
            functools.partial(sft_loss, graphdef=graphdef), state["params"], batch, micro_batches
        )
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        new_state, metrics = apply_update(
            state, grads, nll_sum / denom, tx=tx, schedule=schedule, grad_mask=grad_mask, max_grad_norm=max_grad_norm
        )
        metrics["num_tokens"] = count
        return new_state, metrics


def eval_step(
    params: nnx.State, batch: dict, *, graphdef: nnx.GraphDef, mesh: Mesh | None = None, micro_batches: int = 1
) -> dict:
    """→ {"nll": summed NLL, "tokens": predicted tokens} of one eval batch (micro-batched like training)."""
    with sharding.activation_sharding(mesh):
        batch = SFT_TRAIN.select(batch)
        if micro_batches == 1:
            nll, count = token_nll(params, graphdef, batch)
            return {"nll": nll.sum(), "tokens": count.sum()}
        nll, count = jax.lax.map(lambda mb: token_nll(params, graphdef, mb), split_micro_batches(batch, micro_batches))
        return {"nll": nll.sum(), "tokens": count.sum()}


def jit_train_step(
    graphdef,
    tx,
    schedule,
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


def jit_eval_step(graphdef, mesh: Mesh, micro_batches: int = 1):
    return jax.jit(
        functools.partial(eval_step, graphdef=graphdef, mesh=mesh, micro_batches=micro_batches),
        out_shardings=sharding.replicated(mesh),
    )
