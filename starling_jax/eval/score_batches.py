"""Reward-model scoring of many sequences in length-bucketed micro-batches (used by `python -m starling_jax.score`).

A reward forward pass costs what its padded shape costs, so scoring sequences in file order and padding each
batch to its longest row wastes most of the work on a dataset whose answers range from 20 to 2,000 tokens, and
every new length compiles a new program. Here the N sequences (one per answer, each with the index of the token the
reward is read at) are

1. sorted by length, longest first (the largest program compiles and runs first, so an out-of-memory shows at
   once, not after an hour of short rows);
2. cut into micro-batches of a fixed `rows` sequences (a multiple of the data-parallel size, like the train step's
   micro-batch rows), each padded to the smallest *bucket length* that holds its longest sequence. The buckets are a
   short ladder of multiples of `pad_to_multiple` growing by about `growth` up to `max_length` (128, 256, 384, 640,
   1024, 1536, 2048 for 2048 and the defaults), so at most `len(bucket_lengths(...))` programs ever compile, and a
   row is padded by less than a factor `growth` (plus the multiple);
3. run through one jitted forward (`jit_rewards`) sharded over the mesh's data axes;
4. returned as float32 rewards [N] in the input order.

Padding rows of the last micro-batch have `segment_ids` 0 (attend to nothing) and their outputs are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from starling_jax.data.batch_spec import round_up


def bucket_lengths(max_length: int, pad_to_multiple: int = 128, growth: float = 2**0.5) -> list[int]:
    """The padded lengths a micro-batch may have: b_0 = m, b_{i+1} = round_up(ceil(b_i * growth), m), capped at
    round_up(max_length, m) (the last bucket), where m = `pad_to_multiple`. Strictly increasing multiples of m."""
    if max_length < 1 or pad_to_multiple < 1 or growth <= 1:
        raise ValueError(
            f"bucket_lengths: need max_length ≥ 1, pad_to_multiple ≥ 1, growth > 1; got "
            f"{max_length}, {pad_to_multiple}, {growth}"
        )
    top = round_up(max_length, pad_to_multiple)
    out = [min(pad_to_multiple, top)]
    while out[-1] < top:
        out.append(min(top, max(out[-1] + pad_to_multiple, round_up(math.ceil(out[-1] * growth), pad_to_multiple))))
    return out


def plan_micro_batches(lengths: Sequence[int], rows: int, buckets: Sequence[int]) -> list[tuple[np.ndarray, int]]:
    """→ [(indices into `lengths` (≤ `rows` of them), padded length)], longest sequences first; every index once.

    Each micro-batch's padded length is the smallest bucket ≥ its longest sequence."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and lengths.max() > buckets[-1]:
        raise ValueError(
            f"a sequence of {int(lengths.max())} tokens is longer than the longest bucket "
            f"({buckets[-1]}); raise max_length"
        )
    order = np.argsort(-lengths, kind="stable")  # longest first; ties keep input order
    plan = []
    for start in range(0, len(order), rows):
        idx = order[start : start + rows]
        plan.append((idx, int(buckets[int(np.searchsorted(buckets, lengths[idx[0]]))])))
    return plan


def pack_micro_batch(
    sequences: Sequence[np.ndarray], reward_index: np.ndarray, idx: np.ndarray, rows: int, length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The model inputs of one micro-batch: tokens, positions, segment_ids [rows, length] and reward_index [rows],
    right-padded; rows past len(idx) are padding (segment 0)."""
    tokens = np.full((rows, length), pad_id, np.int32)
    positions = np.zeros((rows, length), np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    index = np.zeros((rows,), np.int32)
    for r, s in enumerate(idx):
        t = sequences[s]
        tokens[r, : len(t)] = t
        positions[r, : len(t)] = np.arange(len(t))
        segment_ids[r, : len(t)] = 1
        index[r] = reward_index[s]
    return tokens, positions, segment_ids, index


def jit_rewards(graphdef, mesh):
    """The jitted reward forward: (params, tokens, positions, segment_ids [N, L], reward_index [N]) → rewards [N],
    the batch sharded over the mesh's data axes, the result replicated."""
    import jax
    from flax import nnx

    from starling_jax.parallel import sharding

    batch = sharding.batch_sharding(mesh, 2)

    def rewards(params, tokens, positions, segment_ids, reward_index):
        with sharding.activation_sharding(mesh):
            return nnx.merge(graphdef, params).rewards(tokens, positions, segment_ids, reward_index)

    return jax.jit(
        rewards,
        in_shardings=(None, batch, batch, batch, sharding.batch_sharding(mesh, 1)),
        out_shardings=sharding.replicated(mesh),
    )


class BucketedScorer:
    """Scores sequences with a reward model in length-bucketed micro-batches (see the module docstring).

    `rows` is rounded up to a multiple of the mesh's data-parallel size. `shapes` records every padded
    (rows, length) run so far: the programs compiled."""

    def __init__(
        self,
        graphdef,
        mesh,
        *,
        rows: int,
        max_length: int,
        pad_to_multiple: int = 128,
        pad_id: int = 0,
        growth: float = 2**0.5,
    ):
        from starling_jax.parallel.sharding import data_parallel_size

        n_dev = data_parallel_size(mesh)
        self.rows = max(n_dev, round_up(max(int(rows), 1), n_dev))
        self.buckets = bucket_lengths(max_length, pad_to_multiple, growth)
        self.pad_id = int(pad_id)
        self.shapes: set[tuple[int, int]] = set()
        self._fn = jit_rewards(graphdef, mesh)

    def __call__(
        self, params, sequences: Sequence[np.ndarray], reward_index: Sequence[int] | None = None
    ) -> np.ndarray:
        """→ float32 rewards [N], in the order of `sequences`; the reward of sequence s is read at
        `reward_index[s]` (default: its last token)."""
        import jax

        lengths = [len(t) for t in sequences]
        if any(n < 1 for n in lengths):
            raise ValueError("BucketedScorer: an empty sequence has no token to read a reward at")
        index = np.asarray([n - 1 for n in lengths] if reward_index is None else reward_index, np.int64)
        if index.shape != (len(lengths),) or np.any(index < 0) or np.any(index >= np.asarray(lengths)):
            raise ValueError("BucketedScorer: reward_index must give one position inside each sequence")
        out = np.zeros(len(lengths), np.float32)
        for idx, length in plan_micro_batches(lengths, self.rows, self.buckets):
            self.shapes.add((self.rows, length))
            batch = pack_micro_batch(sequences, index, idx, self.rows, length, self.pad_id)
            out[idx] = np.asarray(jax.device_get(self._fn(params, *batch)))[: len(idx)]
        return out


def jit_completion_logprobs(graphdef, mesh):
    """The jitted causal-LM forward for DPO scoring: (params, tokens, positions, segment_ids [N, L], start [N],
    end [N]) → Σ_{start ≤ c ≤ end} log p(tokens[n, c] | tokens[n, :c]) [N] (float32), sharded like `jit_rewards`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from starling_jax.losses.logprobs import token_logprobs
    from starling_jax.parallel import sharding

    batch, rows = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)

    def logprobs(params, tokens, positions, segment_ids, start, end):
        with sharding.activation_sharding(mesh):
            logits = nnx.merge(graphdef, params)(tokens, positions, segment_ids)
            lp = token_logprobs(logits, tokens, segment_ids)
            col = jnp.arange(tokens.shape[1])
            inside = (col >= start[:, None]) & (col <= end[:, None])
            return jnp.sum(jnp.where(inside, lp, 0.0), axis=-1)

    return jax.jit(
        logprobs, in_shardings=(None, batch, batch, batch, rows, rows), out_shardings=sharding.replicated(mesh)
    )


class BucketedLogProbs(BucketedScorer):
    """A causal LM's log-probability of each sequence's tokens from `start` on (an answer after its prompt), in
    the same length-bucketed micro-batches as `BucketedScorer` (DPO implied rewards: `score --reference`)."""

    def __init__(self, graphdef, mesh, **kwargs):
        super().__init__(graphdef, mesh, **kwargs)
        self._fn = jit_completion_logprobs(graphdef, mesh)

    def __call__(self, params, sequences: Sequence[np.ndarray], starts: Sequence[int]) -> np.ndarray:  # type: ignore[override]
        """→ float32 [N]: Σ of log p(token | the tokens before it) over tokens[starts[s]:] of each sequence s."""
        import jax

        lengths = np.asarray([len(t) for t in sequences], np.int64)
        starts = np.asarray(starts, np.int64)
        if starts.shape != lengths.shape or np.any(starts < 1) or np.any(starts >= lengths):
            raise ValueError("BucketedLogProbs: every sequence needs 1 <= start < its length (a prompt, an answer)")
        out = np.zeros(len(lengths), np.float32)
        for idx, length in plan_micro_batches(lengths, self.rows, self.buckets):
            self.shapes.add((self.rows, length))
            tokens, positions, segment_ids, end = pack_micro_batch(
                sequences, lengths - 1, idx, self.rows, length, self.pad_id
            )
            start = np.zeros((self.rows,), np.int32)
            start[: len(idx)] = starts[idx]
            out[idx] = np.asarray(jax.device_get(self._fn(params, tokens, positions, segment_ids, start, end)))[
                : len(idx)
            ]
        return out


class ImpliedRewards:
    """DPO implied rewards r = β · (Σ log π − Σ log π_ref), the sums over each sequence's tokens from its `start` on
    (the answer and the template's end-of-turn tokens after it), each model's sums by a `BucketedLogProbs`: the one
    implementation of `score --reference` and `evaluate rewardbench --reference`."""

    def __init__(self, graphdef, ref_graphdef, mesh, beta: float, **kwargs):
        self.beta = float(beta)
        self.policy = BucketedLogProbs(graphdef, mesh, **kwargs)
        self.reference = BucketedLogProbs(ref_graphdef, mesh, **kwargs)

    def __call__(self, params, ref_params, sequences: Sequence[np.ndarray], starts: Sequence[int]) -> np.ndarray:
        """→ float64 [N] implied rewards, in the order of `sequences`."""
        if not len(sequences):
            return np.zeros(0, np.float64)
        return self.beta * (
            self.policy(params, sequences, starts).astype(np.float64)
            - self.reference(ref_params, sequences, starts).astype(np.float64)
        )
