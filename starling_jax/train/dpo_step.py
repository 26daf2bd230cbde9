"""The DPO train and eval steps: K-wise rankings scored by a causal LM's answer log-probabilities.

An answer's log-probability is the sum, over its tokens after the prompt (answer text and template suffix; the
`completion_lengths` tokens ending at its `reward_index`), of log π(token | everything before it). A token's
log-probability is read from the logits of its *predecessor*: the previous column, except for the first token of
an answer in a shared-prefix group, whose predecessor is the last token of the group's prompt
(`predecessor_columns`). The batch layouts of `data/layout.py` (per-answer [B, K, L] rows, shared-prefix and packed
[R, L] rows) therefore give the same per-answer sums; the pipeline (`completions=True`) keeps every answer token in
its own segment.

One step: the policy's (and, on the fly, the frozen reference's) log-probs of every answer of every prompt in one
forward pass each (one pass through the shared bottom with a hydra reference), the selected preference loss
(`losses/preference.py`), one optimizer update (gradient accumulation over micro-batches as in `train/step.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from starling_jax.data.batch_spec import BatchSpec, Field, kwise_specs
from starling_jax.losses.logprobs import answer_logprobs, token_logprobs
from starling_jax.losses.preference import PREFERENCE_LOSSES, implied_rewards
from starling_jax.model.hydra import actor_logits, hydra_logits
from starling_jax.parallel import sharding
from starling_jax.train.dpo_config import DPOLossConfig
from starling_jax.train.rm_step import batch_pairwise_accuracy
from starling_jax.train.state import TrainState
from starling_jax.train.step import (
    accumulate_gradients,
    apply_update,
    merge_micro_batches,
    split_micro_batches,
)

COMPLETION_LENGTHS = Field("completion_lengths", "int32", ("B", "K"))
REFERENCE_LOGPS = Field("reference_logps", "float32", ("B", "K"))


def dpo_specs(packed: bool, precomputed: bool) -> tuple[BatchSpec, BatchSpec]:
    """(train spec, eval spec): the K-wise batch + `completion_lengths` (+ `reference_logps` when precomputed)."""
    extra = (COMPLETION_LENGTHS,) + ((REFERENCE_LOGPS,) if precomputed else ())
    train, evals = kwise_specs(packed)
    return (BatchSpec("dpo_" + train.name, train.fields + extra), BatchSpec("dpo_" + evals.name, evals.fields + extra))


def spec_of(batch: dict) -> BatchSpec:
    return dpo_specs("reward_row" in batch, "reference_logps" in batch)[0]


def _flat(batch: dict):
    t, p, s = batch["tokens"], batch["positions"], batch["segment_ids"]
    if t.ndim == 3:
        n = t.shape[0] * t.shape[1]
        t, p, s = (x.reshape(n, x.shape[-1]) for x in (t, p, s))
    return t, p, s


def sequence_logprobs(
    params: nnx.State,
    ref_params: nnx.State | None,
    batch: dict,
    *,
    graphdef,
    ref_graphdef,
    frozen_layers: int = 0,
    hydra: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """→ (policy log-probs [B, K], reference log-probs [B, K], stop-gradient) of every answer. The reference's
    come from `batch["reference_logps"]` when precomputed (`ref_params` None), from one pass through the shared
    bottom with a hydra reference (`ReferenceTop`), else from a second forward of the full frozen copy."""
    tokens, positions, segment_ids = _flat(batch)
    policy = nnx.merge(graphdef, params)
    ref_lp = None
    if hydra and ref_params is not None:  # ref_graphdef: a ReferenceTop
        logits, ref_logits = hydra_logits(policy, nnx.merge(ref_graphdef, ref_params), tokens, positions, segment_ids)
        ref_lp = answer_logprobs(token_logprobs(ref_logits, tokens, segment_ids), batch)
    elif frozen_layers:
        logits = actor_logits(policy, tokens, positions, segment_ids, frozen_layers)
    else:
        logits = policy(tokens, positions, segment_ids)
    pol_lp = answer_logprobs(token_logprobs(logits, tokens, segment_ids), batch)
    if ref_lp is None:
        if ref_params is None:
            ref_lp = batch["reference_logps"]
        else:
            ref_logits = nnx.merge(ref_graphdef, ref_params)(tokens, positions, segment_ids)
            ref_lp = answer_logprobs(token_logprobs(ref_logits, tokens, segment_ids), batch)
    return pol_lp, jax.lax.stop_gradient(ref_lp.astype(jnp.float32))


def preference_loss(policy_logps, reference_logps, batch: dict, loss_cfg: DPOLossConfig):
    """The configured loss of `losses/preference.py` → (loss, aux)."""
    kwargs = {"beta": loss_cfg.beta}
    if loss_cfg.name == "pairwise":
        kwargs.update(label_smoothing=loss_cfg.label_smoothing, pairs=loss_cfg.pairs)
    elif loss_cfg.name == "ipo":
        kwargs.update(completion_lengths=batch["completion_lengths"], pairs=loss_cfg.pairs)
    return PREFERENCE_LOSSES[loss_cfg.name](
        policy_logps, reference_logps, batch["ranks"], batch["answer_mask"], **kwargs
    )


def dpo_loss(
    params,
    batch,
    *,
    ref_params,
    graphdef,
    ref_graphdef,
    loss_cfg: DPOLossConfig,
    frozen_layers: int = 0,
    hydra: bool = False,
):
    """→ (loss summed over valid prompts, (num valid prompts, {"policy_logps", "reference_logps"} [B, K])).
    Summed, not averaged, so that micro-batches add up to exactly the full-batch mean."""
    pol, ref = sequence_logprobs(
        params,
        ref_params,
        batch,
        graphdef=graphdef,
        ref_graphdef=ref_graphdef,
        frozen_layers=frozen_layers,
        hydra=hydra,
    )
    loss, aux = preference_loss(pol, ref, batch, loss_cfg)
    count = aux["num_valid_prompts"].astype(jnp.float32)
    return loss * count, (count, {"policy_logps": pol, "reference_logps": ref})


def train_step(
    state: TrainState,
    ref_params,
    batch: dict,
    *,
    graphdef,
    ref_graphdef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_cfg: DPOLossConfig,
    micro_batches: int = 1,
    mesh: Mesh | None = None,
    grad_mask=None,
    max_grad_norm: float = 0.0,
    frozen_layers: int = 0,
    hydra: bool = False,
) -> tuple[TrainState, dict]:
    """One optimizer update (`step.apply_update`'s non-finite guard); `ref_params` are read, never donated."""
    with sharding.activation_sharding(mesh):
        batch = spec_of(batch).select(batch)
        loss_fn = functools.partial(
            dpo_loss,
            ref_params=ref_params,
            graphdef=graphdef,
            ref_graphdef=ref_graphdef,
            loss_cfg=loss_cfg,
            frozen_layers=frozen_layers,
            hydra=hydra,
        )
        loss_sum, count, grads, aux = accumulate_gradients(loss_fn, state["params"], batch, micro_batches)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        new_state, metrics = apply_update(
            state, grads, loss_sum / denom, tx=tx, schedule=schedule, grad_mask=grad_mask, max_grad_norm=max_grad_norm
        )
        rewards = implied_rewards(aux["policy_logps"], aux["reference_logps"], loss_cfg.beta)
        metrics["num_prompts"] = count
        metrics["batch_pairwise_accuracy"] = batch_pairwise_accuracy(rewards, batch["ranks"], batch["answer_mask"])
        return new_state, metrics


def eval_step(
    params,
    ref_params,
    batch: dict,
    *,
    graphdef,
    ref_graphdef,
    mesh: Mesh | None = None,
    micro_batches: int = 1,
    frozen_layers: int = 0,
    hydra: bool = False,
) -> dict:
    """Policy and reference log-probs of an eval batch (in `micro_batches` interleaved chunks, as the train step
    splits its batch) with the fields the metrics read."""
    fn = functools.partial(
        sequence_logprobs,
        ref_params=ref_params,
        graphdef=graphdef,
        ref_graphdef=ref_graphdef,
        frozen_layers=frozen_layers,
        hydra=hydra,
    )
    with sharding.activation_sharding(mesh):
        if micro_batches == 1:
            pol, ref = fn(params, batch=batch)
        else:
            pol, ref = jax.lax.map(lambda mb: fn(params, batch=mb), split_micro_batches(batch, micro_batches))
            pol, ref = merge_micro_batches(pol), merge_micro_batches(ref)
    return {
        "policy_logps": pol,
        "reference_logps": ref,
        "ranks": batch["ranks"],
        "answer_mask": batch["answer_mask"],
        "answer_lengths": batch["answer_lengths"],
    }


def jit_train_step(
    graphdef,
    ref_graphdef,
    tx,
    schedule,
    loss_cfg: DPOLossConfig,
    micro_batches: int,
    mesh: Mesh,
    state_shardings: TrainState,
    ref_shardings,
    batch_shardings: dict,
    grad_mask=None,
    max_grad_norm: float = 0.0,
    frozen_layers: int = 0,
    hydra: bool = False,
):
    fn = functools.partial(
        train_step,
        graphdef=graphdef,
        ref_graphdef=ref_graphdef,
        tx=tx,
        schedule=schedule,
        loss_cfg=loss_cfg,
        micro_batches=micro_batches,
        mesh=mesh,
        grad_mask=grad_mask,
        max_grad_norm=max_grad_norm,
        frozen_layers=frozen_layers,
        hydra=hydra,
    )
    return jax.jit(
        fn,
        in_shardings=(state_shardings, ref_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def jit_eval_step(
    graphdef, ref_graphdef, mesh: Mesh, micro_batches: int = 1, frozen_layers: int = 0, hydra: bool = False
):
    return jax.jit(
        functools.partial(
            eval_step,
            graphdef=graphdef,
            ref_graphdef=ref_graphdef,
            mesh=mesh,
            micro_batches=micro_batches,
            frozen_layers=frozen_layers,
            hydra=hydra,
        ),
        out_shardings=sharding.replicated(mesh),
    )
