"""Supervised fine-tuning examples: conversations rendered with a chat template, loss on the assistant's answer.

Sources (one file, or a Hub dataset name, read by `data/nectar.py`'s readers):
- Nectar-schema rows (`prompt` + ranked `answers`): one example per rank-1 answer; ties at the best rank give one
  example per tied-best answer (a row ranked 1, 1, 3 gives two).
- JSON lines of `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` ending with an
  assistant turn: the final assistant turn is the answer, everything before it the prompt (earlier assistant
  turns are context and carry no loss).

Rendering and truncation are `data/tokenize.py::tokenize_answers` (the reward model's: the same template, BOS rule
and left truncation of the oldest turns). The loss mask covers the answer's tokens and the template's end-of-turn
suffix after it (so the model learns to stop), never the prompt. The split is by prompt hash (`split_of`), as for
the reward model, so no prompt is in both splits.

Batches (`data/batch_spec.py::SFT`): tokens / positions / segment_ids / loss_mask [B, L] and the source `row`,
right-padded to a multiple of `pad_to_multiple`, drawn by the reward pipeline's `batch_plan` (seeded shuffle,
length buckets, per-host slices) with an exact, JSON-serializable position.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from starling_jax.data.batch_spec import SFT, round_up
from starling_jax.data.chat import Message, to_hh
from starling_jax.data.nectar import (
    BadRow,
    Ranking,
    ReadReport,
    empty_split_message,
    iter_raw_rows,
    read_rankings,
    split_of,
    validated_rows,
)
from starling_jax.data.pipeline import batch_plan
from starling_jax.data.resumable import ResumableIterator
from starling_jax.data.tokenize import RowDoesNotFit, tokenize_answers
from starling_jax.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One SFT example before tokenization: prompt messages (ending with a user turn) and the answer."""

    row: int
    messages: tuple[Message, ...]
    answer: str

    @property
    def split_key(self) -> str:
        return to_hh([m for m in self.messages if m["role"] != "system"])


@dataclasses.dataclass(frozen=True)
class SFTExample:
    row: int
    tokens: np.ndarray  # int32 [n]
    answer_start: int  # tokens[answer_start:] are predicted (answer + end-of-turn); the rest is prompt

    def __len__(self) -> int:
        return len(self.tokens)


def best_answers(ranking: Ranking) -> list[str]:
    """The rank-1 answers of a row: every answer tied at the best rank, in row order."""
    best = min(ranking.ranks)
    return [a for a, r in zip(ranking.answers, ranking.ranks) if r == best]


def validate_messages(raw: Any) -> tuple[tuple[Message, ...], str]:
    """A `{"messages": [...]}` row → (prompt messages, final answer); BadRow with the reason otherwise."""
    msgs = raw.get("messages") if isinstance(raw, dict) else None
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise BadRow("'messages' must be a list of at least two {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRow(f"messages[{i}] must be an object with role in {list(ROLES)} and a string content")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise BadRow("the last message must be the assistant's answer")
    if out[-2]["role"] != "user":
        raise BadRow("the answer must follow a user message")
    return tuple(out[:-1]), out[-1]["content"]


def read_conversations(
    source: str | Path, on_bad_row: str = "error", report: ReadReport | None = None
) -> Iterator[Conversation]:
    """Stream `Conversation`s from a Nectar-schema or `messages` file (the first row decides which)."""
    report = report if report is not None else ReadReport()
    report.source = str(source)
    rows = iter(iter_raw_rows(source))
    first = next(rows, None)
    if first is None:
        return
    rows_all = _chain(first, rows)
    if isinstance(first[1], dict) and "messages" in first[1]:
        yield from validated_rows(rows_all, _conversation, source, on_bad_row, report)
        return
    for ranking in read_rankings(source, on_bad_row, report, rows=rows_all):
        for answer in best_answers(ranking):
            yield Conversation(ranking.row, ranking.messages, answer)


def _conversation(raw: Any, row: int) -> Conversation:
    if not isinstance(raw, dict):
        raise BadRow("not a JSON object")
    messages, answer = validate_messages(raw)
    return Conversation(row, messages, answer)


def _chain(first, rest):
    yield first
    yield from rest


def tokenize_conversation(conv: Conversation, tokenizer, template: str, max_length: int) -> SFTExample:
    (t,) = tokenize_answers(tokenizer, conv.messages, [conv.answer], template, max_length)
    return SFTExample(conv.row, np.asarray(t.tokens, np.int32), int(t.answer_start))


def load_examples(
    source, split: str, *, tokenizer, template: str, max_length: int, eval_fraction: float, on_bad_row: str = "error"
) -> tuple[list[SFTExample], ReadReport]:
    """The examples of one split (`eval_fraction=0`: every row is `train`); rows too long for `max_length` follow
    `on_bad_row` like invalid ones."""
    report = ReadReport()
    out = []
    for conv in read_conversations(source, on_bad_row, report):
        if (split_of(conv.split_key, eval_fraction) if eval_fraction else "train") != split:
            continue
        try:
            out.append(tokenize_conversation(conv, tokenizer, template, max_length))
        except RowDoesNotFit as e:
            if on_bad_row == "error":
                raise DataError(f"{source}: row {conv.row}: {e} (on_bad_row=skip drops such rows)") from None
            report.skip(conv.row, str(e))
    return out, report


def make_batch(examples: list[SFTExample | None], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded [B, L] batch (None = a padding row); the spec's pad values elsewhere."""
    batch = SFT.empty({"B": len(examples), "L": length})
    batch["tokens"][:] = pad_id
    for i, ex in enumerate(examples):
        if ex is None:
            continue
        n = len(ex)
        if n > length:
            raise DataError(f"row {ex.row}: {n} tokens > batch length {length}")
        batch["tokens"][i, :n] = ex.tokens
        batch["positions"][i, :n] = np.arange(n)
        batch["segment_ids"][i, :n] = 1
        batch["loss_mask"][i, ex.answer_start : n] = True
        batch["row"][i] = ex.row
    return batch


class SFTPipeline(ResumableIterator):
    """Per-host SFT batches with an exact position (`resumable.ResumableIterator`); `mode="eval"`: one pass in
    file order."""

    def __init__(
        self,
        examples: list[SFTExample],
        *,
        global_batch_size: int,
        max_length: int,
        pad_to_multiple: int = 128,
        pad_id: int = 0,
        seed: int = 0,
        mode: str = "train",
        process_index: int = 0,
        process_count: int = 1,
        report: ReadReport | None = None,
        name: str = "",
        split: str | None = None,
        eval_fraction: float = 0.0,
    ):
        if not examples:  # name the file (`name`) and why its split is empty
            raise DataError(empty_split_message(name or "the dataset", split or mode, report, eval_fraction))
        if global_batch_size % process_count:
            raise DataError(f"global batch size {global_batch_size} is not divisible by {process_count} processes")
        self.examples = examples
        self.report = report
        self.global_batch_size = global_batch_size
        self.per_host = global_batch_size // process_count
        self.process_index = process_index
        self.max_l = round_up(max_length, pad_to_multiple)
        self.pad_to_multiple = pad_to_multiple
        self.pad_id = pad_id
        self.seed = seed
        self.mode = mode
        self.lengths = np.asarray([len(e) for e in examples])
        self.epoch = self.batch = 0
        self._plan_epoch, self._plan = None, None

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    @property
    def num_batches_per_epoch(self) -> int:
        return -(-self.num_examples // self.global_batch_size)

    def plan(self, epoch: int) -> np.ndarray:
        if self._plan_epoch != epoch:
            self._plan = batch_plan(
                self.lengths, self.global_batch_size, seed=self.seed, epoch=epoch, shuffle=self.mode == "train"
            )
            self._plan_epoch = epoch
        return self._plan

    def host_batch(self, epoch: int, batch: int) -> dict:
        g = self.plan(epoch)[batch]
        real = g[g >= 0]
        length = min(round_up(int(self.lengths[real].max()), self.pad_to_multiple), self.max_l)
        mine = g[self.process_index * self.per_host : (self.process_index + 1) * self.per_host]
        return make_batch([self.examples[i] if i >= 0 else None for i in mine], length, self.pad_id)

    def fetch(self, epoch: int, batch: int) -> dict:
        return self.host_batch(epoch, batch)
