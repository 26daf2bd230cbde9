"""Log-probabilities of answers under a causal LM, read from one forward pass over a K-wise batch (any layout:
per answer, shared prefix, packed). DPO's implied rewards (`train/dpo_step.py`) and `score --reference`
(`eval/score_batches.py`) sum them over each answer's tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from starling_jax.data.layout import PREFIX_STRIDE


# ------------------------------------------------------------------------------------------------ log-probs
def predecessor_columns(segment_ids: jax.Array) -> jax.Array:
    """[N, L] → the column whose logits predict each token: c − 1, except at the first token of a shared-prefix
    answer segment (id g·2¹⁶ + k), which continues its group's prompt (id g·2¹⁶): the last prompt column before it.
    Column 0 (no predecessor) maps to 0; callers never count its log-prob."""
    n, length = segment_ids.shape
    col = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
    is_prompt = (segment_ids % PREFIX_STRIDE == 0) & (segment_ids != 0)
    last_prompt = jax.lax.cummax(jnp.where(is_prompt, col, -1), axis=1)
    before = jnp.concatenate([jnp.zeros((n, 1), segment_ids.dtype), segment_ids[:, :-1]], axis=1)
    answer_start = (segment_ids >= PREFIX_STRIDE) & ~is_prompt & (segment_ids != before)
    return jnp.where(answer_start, last_prompt, jnp.maximum(col - 1, 0))


def token_logprobs(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """logits [N, L, V], tokens [N, L] → log p(tokens[n, c] | its predecessors) [N, L] float32 (garbage at
    columns that predict nothing: callers select answer tokens)."""
    prev = predecessor_columns(segment_ids)
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [N, L]
    rows = jnp.arange(tokens.shape[0])[:, None]
    return logits[rows, prev, tokens] - jnp.take_along_axis(lse, prev, axis=1)


def answer_rows(batch: dict) -> jax.Array:
    """[B, K] row of each answer in the model-facing arrays (per-answer batches are flattened to [B·K, L])."""
    if batch["tokens"].ndim == 3:
        b, k, _ = batch["tokens"].shape
        return jnp.arange(b * k, dtype=jnp.int32).reshape(b, k)
    return batch["reward_row"]


def answer_logprobs(token_lp: jax.Array, batch: dict) -> jax.Array:
    """Per-token log-probs [N, L] → each answer's sum over its `completion_lengths` tokens ending at its
    `reward_index` [B, K] (0 for empty slots)."""
    rows = token_lp[answer_rows(batch)]  # [B, K, L]
    col = jnp.arange(rows.shape[-1])
    end = batch["reward_index"][..., None]
    inside = (col > end - batch["completion_lengths"][..., None]) & (col <= end)
    return jnp.sum(jnp.where(inside, rows, 0.0), axis=-1)
