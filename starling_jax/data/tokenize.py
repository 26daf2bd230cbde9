"""Tokenization of rankings: per-answer token ids, where the answer starts, the reward index, truncation.

Each answer becomes one sequence `render(prompt messages + answer)` tokenized with the tokenizer. The answer
start is the length of the common prefix of the tokenized prompt rendering (with the generation prompt) and the
tokenized full rendering; the template suffix after the answer text (e.g. `</s>`) is the common suffix of the
full rendering and the rendering with an empty answer. So a sequence is `prompt | answer text | suffix`, and

    reward_index = len(sequence) - 1     (the last token of the rendered conversation, from the explicit count)

Truncation to `max_length`, like Starling-RM (its tokenizer had `truncation_side="left"`): tokens are cut
from the LEFT, so the end of the dialogue and the answer are kept; the BOS stays at position 0. Unlike a
per-sequence left cut, all answers of a row keep the SAME prompt context: one left cut of the prompt, sized by
the row's longest answer, is applied to every answer (longer answers never see a shorter context). The prompt
keeps at least `min_prompt_tokens` (default min(64, max_length // 4)) of its end; only an answer that still does
not fit then loses the beginning of its own text. The answer's end, the template suffix and so the reward token
are never cut: a cut answer never gets a fresh `</s>` that would make it look finished. If an answer cannot keep
at least one of its tokens, the row does not fit: `RowDoesNotFit` (reported and skipped by the callers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from starling_jax.data.chat import Message, adds_bos_by_tokenizer, render
from starling_jax.data.nectar import BadRow, Ranking


class RowDoesNotFit(BadRow):
    """An answer of the row cannot fit in max_length even after truncation."""


@dataclasses.dataclass
class TokenizedAnswer:
    tokens: np.ndarray  # int32 [n]
    answer_start: int  # index of the first answer token
    answer_length: int  # number of answer-text tokens (template suffix excluded)
    reward_index: int  # = n - 1
    prompt_cut: int = 0  # prompt tokens cut from the left (after the BOS); the same for every answer of a row
    answer_cut: int = 0  # answer-text tokens cut from the left (its end is kept)

    @property
    def truncated(self) -> bool:
        return bool(self.prompt_cut or self.answer_cut)


@dataclasses.dataclass
class TokenizedRanking:
    """A `Ranking` after tokenization; answers in the row's ORIGINAL order."""

    row: int
    tokens: list  # per answer: int32 np.ndarray
    answer_start: np.ndarray  # int32 [n]
    answer_lengths: np.ndarray  # int32 [n]
    reward_index: np.ndarray  # int32 [n]
    ranks: np.ndarray  # float32 [n]
    models: tuple = ()
    sources: tuple = ()
    turns: int = 1
    good_natured: bool | None = None
    prompt_cut: np.ndarray | None = None  # int32 [n]
    answer_cut: np.ndarray | None = None  # int32 [n]

    @property
    def num_answers(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(t) for t in self.tokens], np.int32)

    @property
    def truncated(self) -> bool:
        return bool(np.any(self.prompt_cut) or np.any(self.answer_cut))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[len(a) - 1 - i] == b[len(b) - 1 - i]:
        i += 1
    return i


class _Conversation:
    """Renders/tokenizes one prompt and caches the answer-independent parts."""

    def __init__(self, tokenizer, messages: list[Message], template: str):
        self.tok = tokenizer
        self.messages = messages
        self.template = template
        self.add_special = adds_bos_by_tokenizer(template)
        self.prompt_ids = self.encode(render(tokenizer, messages, template))
        self.empty_ids = self.encode(render(tokenizer, messages, template, answer=""))
        self.empty_start = _common_prefix(self.prompt_ids, self.empty_ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=self.add_special)["input_ids"])

    def split(self, answer: str) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, answer-text ids, suffix ids) of the full rendering."""
        full = self.encode(render(self.tok, self.messages, self.template, answer=answer))
        start = _common_prefix(self.prompt_ids, full)
        rest = full[start:]
        suffix = min(_common_suffix(rest, self.empty_ids[self.empty_start :]), len(rest))
        if answer and suffix == len(rest) and rest:
            suffix = len(rest) - 1  # a non-empty answer has at least one token of its own
        return full[:start], rest[: len(rest) - suffix], rest[len(rest) - suffix :]


def tokenize_answers(
    tokenizer,
    messages: Sequence[Message],
    answers: Sequence[str],
    template: str,
    max_length: int,
    min_prompt_tokens: int | None = None,
) -> list[TokenizedAnswer]:
    """Tokenize prompt `messages` + each answer; truncate from the left to `max_length` (see module doc).

    The function the trainer and the `score` tool reuse. Raises `RowDoesNotFit` if an answer cannot fit.
    """
    if max_length < 2:
        raise RowDoesNotFit(f"max_length {max_length} is too small")
    if min_prompt_tokens is None:
        min_prompt_tokens = min(64, max_length // 4)
    conv = _Conversation(tokenizer, list(messages), template)
    parts = [conv.split(answer) for answer in answers]
    bos = getattr(tokenizer, "bos_token_id", None)
    # The BOS the tokenizer adds stays at position 0 (HF's left truncation also keeps the special tokens).
    head = 1 if (conv.add_special and parts and parts[0][0] and parts[0][0][0] == bos) else 0
    # One left cut of the prompt, sized by the longest answer, shared by every answer of the row...
    need = max(len(p) + len(c) + len(s) for p, c, s in parts) - max_length if parts else 0
    shortest_prompt = min(len(p) for p, _, _ in parts) if parts else 0
    keep_min = min(shortest_prompt - head, max(1, min_prompt_tokens))
    prompt_cut = max(0, min(need, shortest_prompt - head - keep_min))
    out = []
    for j, (p, c, s) in enumerate(parts):
        if prompt_cut:
            p = p[:head] + p[head + prompt_cut :]
        # ...then, only where that is not enough, the answer text loses its beginning (its end, the template
        # suffix and so the reward token are never cut).
        answer_cut = max(0, len(p) + len(c) + len(s) - max_length)
        if answer_cut and len(c) - answer_cut < 1:
            raise RowDoesNotFit(
                f"answer {j} cannot fit in max_length {max_length} "
                f"(prompt kept {len(p)} tokens, template suffix {len(s)})"
            )
        c = c[answer_cut:]
        seq = np.asarray(p + c + s, np.int32)
        out.append(
            TokenizedAnswer(
                tokens=seq,
                answer_start=len(p),
                answer_length=len(c),
                reward_index=len(seq) - 1,
                prompt_cut=prompt_cut,
                answer_cut=answer_cut,
            )
        )
    return out


def tokenize_ranking(
    ranking: Ranking, tokenizer, template: str, max_length: int, min_prompt_tokens: int | None = None
) -> TokenizedRanking:
    """`Ranking` → `TokenizedRanking` (answers in original order). Raises `RowDoesNotFit`."""
    ans = tokenize_answers(tokenizer, ranking.messages, ranking.answers, template, max_length, min_prompt_tokens)
    i32 = lambda xs: np.asarray(xs, np.int32)  # noqa: E731
    return TokenizedRanking(
        row=ranking.row,
        tokens=[a.tokens for a in ans],
        answer_start=i32([a.answer_start for a in ans]),
        answer_lengths=i32([a.answer_length for a in ans]),
        reward_index=i32([a.reward_index for a in ans]),
        ranks=np.asarray(ranking.ranks, np.float32),
        models=ranking.models,
        sources=ranking.sources,
        turns=ranking.turns,
        good_natured=ranking.good_natured,
        prompt_cut=i32([a.prompt_cut for a in ans]),
        answer_cut=i32([a.answer_cut for a in ans]),
    )


class LengthStats:
    """Accumulates sequence / prompt / answer token counts for the report."""

    def __init__(self):
        self.seq: list[int] = []
        self.prompt: list[int] = []
        self.answer: list[int] = []

    def add(self, t: TokenizedRanking) -> None:
        self.seq.extend(int(len(x)) for x in t.tokens)
        self.prompt.extend(int(x) for x in t.answer_start)
        self.answer.extend(int(x) for x in t.answer_lengths)

    @staticmethod
    def _summary(xs: list[int]) -> dict:
        if not xs:
            return {"count": 0}
        a = np.asarray(xs)
        return {
            "count": int(a.size),
            "min": int(a.min()),
            "mean": round(float(a.mean()), 2),
            "p50": int(np.percentile(a, 50)),
            "p90": int(np.percentile(a, 90)),
            "p99": int(np.percentile(a, 99)),
            "max": int(a.max()),
        }

    def as_dict(self) -> dict:
        return {
            "sequence_tokens": self._summary(self.seq),
            "prompt_tokens": self._summary(self.prompt),
            "answer_tokens": self._summary(self.answer),
        }
