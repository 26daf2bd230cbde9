"""Row layouts of a K-wise batch: per-answer rows, shared-prefix rows, packing (pure numpy, host side).

A *unit* is what must stay contiguous in one row:
  per_answer     one answer's full sequence (prompt + answer): a plain segment, positions 0..n-1.
  shared_prefix  the prompt once, then each of the prompt's answers (its tokens after the prompt): segment ids
                 g·PREFIX_STRIDE on the prompt and g·PREFIX_STRIDE + k on answer k (k = 1..), positions 0..P-1 on
                 the prompt and P.. on every answer (each continues from the prompt's end). With the attention
                 rule of `model/attention/rule.py` an answer sees its prompt and itself, so its hidden states, and the
                 reward at its last token, equal those of its per-answer sequence. A prompt whose unit is longer
                 than the row length falls back to per-answer units.
The prompt P is the longest common token prefix of the prompt's answer sequences (at most the shortest one
minus 1 token, so every answer keeps its reward token); after Starling left truncation (data/tokenize.py) all
answers of a row share one prompt context.

Packing places units into rows of length L, first-fit by decreasing length, with segment ids restarting at 1 in
every row. Micro-batches: prompt b's units go only to rows r with r ≡ b (mod micro_batches), so the interleaved
micro-batch split of `train/rm_step.py` (row m, m+M, ... → micro-batch m) keeps each prompt with its rows, and
`reward_row` holds the row index *inside that micro-batch* (r // M) plus `row_offset`.

The packed batch (ARCHITECTURE.md, "The K-wise batch"): tokens / positions / segment_ids int32 [R, L];
reward_row, reward_index int32 [B, K] (row and column of each answer's reward token); ranks, answer_mask,
answer_lengths [B, K] as in the per-answer layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from starling_jax.errors import DataError

# Segment ids of a shared-prefix group g: g·PREFIX_STRIDE on its prompt, g·PREFIX_STRIDE + k on answer k; plain
# segments are 1 .. PREFIX_STRIDE − 1. The attention rule (model/attention/rule.py) reads the same encoding.
PREFIX_BITS = 16
PREFIX_STRIDE = 1 << PREFIX_BITS

LAYOUTS = ("per_answer", "shared_prefix")


def shared_prefix_length(seqs: Sequence[np.ndarray]) -> int:
    """Longest common prefix of the sequences, leaving every sequence at least one token of its own."""
    if len(seqs) < 2:
        return 0
    shortest = min(len(s) for s in seqs)
    first = np.asarray(seqs[0][:shortest])
    same = np.ones(shortest, bool)
    for s in seqs[1:]:
        same &= np.asarray(s[:shortest]) == first
    p = shortest if same.all() else int(np.argmin(same))
    return max(0, min(p, shortest - 1))


@dataclasses.dataclass
class Unit:
    prompt: int  # index of the prompt in the batch
    answers: list  # answer slots (0..K-1) it holds
    prefix: int  # shared prompt tokens (0 = a plain per-answer unit)
    lengths: list  # per answer: its tokens after the prefix (the whole sequence when prefix == 0)

    @property
    def length(self) -> int:
        return self.prefix + sum(self.lengths)


def units_of(
    prompt: int, seqs: Sequence[np.ndarray], layout: str, length: int, max_prefix: int | None = None
) -> list[Unit]:
    """The units of one prompt's answer sequences (slot order) under `layout` for rows of `length` tokens.
    `max_prefix`: the shared prefix holds at most this many tokens (DPO keeps every answer token in its answer's
    own segment: the prefix stops at the answers' first token)."""
    if layout not in LAYOUTS:
        raise DataError(f"data.layout={layout!r}: choose one of {list(LAYOUTS)}")
    for slot, s in enumerate(seqs):
        if len(s) > length:
            raise DataError(f"prompt {prompt}: answer {slot} has {len(s)} tokens > row length {length}")
    p = shared_prefix_length(seqs) if layout == "shared_prefix" else 0
    if max_prefix is not None:
        p = min(p, int(max_prefix))
    return units_from_lengths(prompt, [len(s) for s in seqs], p, length)


def units_from_lengths(prompt: int, seq_lengths: Sequence[int], prefix: int, length: int) -> list[Unit]:
    """`units_of` from the sequence lengths and the shared prefix length (planning without the tokens)."""
    if prefix == 0:
        return [Unit(prompt, [slot], 0, [int(n)]) for slot, n in enumerate(seq_lengths)]
    return split_to_fit(
        Unit(prompt, list(range(len(seq_lengths))), prefix, [int(n) - prefix for n in seq_lengths]), length
    )


def split_to_fit(unit: Unit, room: int) -> list[Unit]:
    """A shared-prefix unit longer than `room` → parts that fit, each with the prompt and the next answers that
    fit after it; a part left with one answer is that answer's plain per-answer sequence (the fallback)."""
    parts, i = [], 0
    while i < len(unit.answers):
        j, total = i + 1, unit.prefix + unit.lengths[i]
        while j < len(unit.answers) and total + unit.lengths[j] <= room:
            total += unit.lengths[j]
            j += 1
        if j - i == 1:
            parts.append(Unit(unit.prompt, [unit.answers[i]], 0, [unit.prefix + unit.lengths[i]]))
        else:
            parts.append(Unit(unit.prompt, unit.answers[i:j], unit.prefix, unit.lengths[i:j]))
        i = j
    return parts


def assign_rows(
    units: list[Unit], length: int, num_rows: int | None, micro_batches: int = 1, packing: bool = True
) -> list[tuple[Unit, int]]:
    """Places units in rows → [(unit, row)]. First fit by decreasing length among the rows of the unit's
    micro-batch class (r ≡ prompt mod micro_batches). With packing, a shared-prefix unit that fits no row whole
    is split: the row with the most room takes the prompt and as many of the answers as fit (the prompt is
    repeated for the rest), so rows fill up to within one answer. Without packing, one unit per row.
    num_rows None = as many rows as needed; otherwise a DataError when they do not fit."""
    m = micro_batches
    free: list[list[int]] = [[] for _ in range(m)]  # per class: free tokens of each of its rows (class-local)
    placed = []
    todo = sorted(units, key=lambda u: (-u.length, u.prompt, u.answers[0]))
    while todo:
        u = todo.pop(0)
        space = free[u.prompt % m]
        j = next((j for j, f in enumerate(space) if f >= u.length), None) if packing else None
        if j is None and packing and u.prefix and space:
            best = int(np.argmax(space))
            fit, total = 0, u.prefix
            while fit < len(u.answers) - 1 and total + u.lengths[fit] <= space[best]:
                total += u.lengths[fit]
                fit += 1
            if fit:  # a part now, the rest (prompt repeated) goes back to the queue
                head = Unit(u.prompt, u.answers[:fit], u.prefix, u.lengths[:fit])
                rest = Unit(u.prompt, u.answers[fit:], u.prefix, u.lengths[fit:])
                if len(rest.answers) == 1:  # a lone answer is its plain per-answer sequence
                    rest = Unit(u.prompt, rest.answers, 0, [u.prefix + rest.lengths[0]])
                space[best] -= head.length
                placed.append((head, best * m + u.prompt % m))
                todo.append(rest)
                todo.sort(key=lambda u: (-u.length, u.prompt, u.answers[0]))
                continue
        if j is None:
            space.append(length)
            j = len(space) - 1
        space[j] -= u.length
        placed.append((u, j * m + u.prompt % m))
    needed = max(len(f) for f in free) * m if units else 0
    if num_rows is not None and needed > num_rows:
        raise DataError(f"the batch needs {needed} rows of {length} tokens, more than the {num_rows} planned")
    return placed


def rows_needed(units: list[Unit], length: int, micro_batches: int = 1, packing: bool = True) -> int:
    """Rows (a multiple of micro_batches) that `assign_rows` uses for these units."""
    if not units:
        return micro_batches
    placed = assign_rows(units, length, None, micro_batches, packing)
    return (max(r for _, r in placed) // micro_batches + 1) * micro_batches


def pack(
    answer_tokens: Sequence[Sequence[np.ndarray]],
    num_answers: int,
    length: int,
    num_rows: int | None = None,
    layout: str = "shared_prefix",
    packing: bool = True,
    micro_batches: int = 1,
    row_offset: int = 0,
    pad_id: int = 0,
    max_prefix: Sequence[int] | None = None,
) -> dict:
    """Prompts' answer sequences (slot order, ≤ K each) → the model-facing arrays of the packed batch.
    `max_prefix`: per prompt, a cap on its shared prefix (`units_of`).

    → tokens, positions, segment_ids int32 [R, L]; reward_row, reward_index int32 [B, K] (empty slots point at
    (row_offset, 0) and are masked by the caller's answer_mask); real_tokens (int, before prefix sharing:
    Σ answer lengths; see `efficiency`)."""
    units = [
        u
        for b, seqs in enumerate(answer_tokens)
        for u in units_of(b, seqs, layout, length, None if max_prefix is None else max_prefix[b])
    ]
    if num_rows is None:
        num_rows = rows_needed(units, length, micro_batches, packing)
    if num_rows % micro_batches:
        raise DataError(f"num_rows {num_rows} is not a multiple of micro_batches {micro_batches}")
    placed = assign_rows(units, length, num_rows, micro_batches, packing)
    b = len(answer_tokens)
    tokens = np.full((num_rows, length), pad_id, np.int32)
    positions = np.zeros((num_rows, length), np.int32)
    segment_ids = np.zeros((num_rows, length), np.int32)
    reward_row = np.full((b, num_answers), row_offset, np.int32)
    reward_index = np.zeros((b, num_answers), np.int32)
    fill = np.zeros(num_rows, np.int64)  # next free column of each row
    next_id = np.ones(num_rows, np.int64)  # next segment (or group) number of each row
    for u, r in sorted(placed, key=lambda x: x[1]):
        seqs = answer_tokens[u.prompt]
        c, g = int(fill[r]), int(next_id[r])
        local_row = row_offset + r // micro_batches
        if u.prefix == 0:
            (slot,) = u.answers
            n = len(seqs[slot])
            tokens[r, c : c + n] = seqs[slot]
            positions[r, c : c + n] = np.arange(n)
            segment_ids[r, c : c + n] = g
            reward_row[u.prompt, slot], reward_index[u.prompt, slot] = local_row, c + n - 1
            c += n
        else:
            p = u.prefix
            tokens[r, c : c + p] = seqs[u.answers[0]][:p]
            positions[r, c : c + p] = np.arange(p)
            segment_ids[r, c : c + p] = g * PREFIX_STRIDE
            c += p
            for k, slot in enumerate(u.answers):
                n = len(seqs[slot]) - p
                tokens[r, c : c + n] = seqs[slot][p:]
                positions[r, c : c + n] = p + np.arange(n)
                segment_ids[r, c : c + n] = g * PREFIX_STRIDE + k + 1
                reward_row[u.prompt, slot], reward_index[u.prompt, slot] = local_row, c + n - 1
                c += n
        fill[r], next_id[r] = c, g + 1
    if next_id.max(initial=1) >= PREFIX_STRIDE:
        raise DataError(f"a row holds {int(next_id.max()) - 1} units; at most {PREFIX_STRIDE - 1}")
    real = sum(len(s) for seqs in answer_tokens for s in seqs)
    return {
        "tokens": tokens,
        "positions": positions,
        "segment_ids": segment_ids,
        "reward_row": reward_row,
        "reward_index": reward_index,
        "real_tokens": real,
    }


def efficiency(batch: dict) -> tuple[float, float]:
    """(padding efficiency = tokens the model processes that are not padding / all processed tokens,
    prefix ratio = tokens processed / Σ per-answer sequence lengths) of a `pack` result."""
    processed = int(np.sum(batch["segment_ids"] != 0))
    return processed / batch["segment_ids"].size, processed / max(1, batch["real_tokens"])
