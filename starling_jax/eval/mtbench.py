"""MT-Bench: question files, single-answer grading prompts (1–10) and per-category scores.

A question file is JSON lines as FastChat's `llm_judge/data/mt_bench/question.jsonl`: `question_id`, `category`,
`turns` (two user messages), optionally `reference` (reference answers per turn, used for the categories FastChat
grades against a reference: math, reasoning, coding). Both turns are answered: turn 2 continues the conversation
[turn 1, the model's answer 1, turn 2].

The judge prompts are FastChat's `llm_judge/data/judge_prompts.jsonl` `single-v1`, `single-v1-multi-turn`,
`single-math-v1`, `single-math-v1-multi-turn` (turn 1 graded alone; turn 2 graded in the whole two-turn
conversation, "focus on the assistant's answer to the second user question"). The rating is read as FastChat does:
the first `[[x]]`, else the first `[x]`; a reply with neither is not a rating (FastChat's −1): counted and reported,
never averaged. The score is the mean of the ratings: per category, per turn, overall (FastChat's `show_result`
averages every rated turn).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from starling_jax.data.nectar import iter_raw_rows
from starling_jax.errors import DataError

NEED_REF_CATEGORIES = ("math", "reasoning", "coding", "arena-hard-200")

_RATE = (
    "After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following "
    'this format: "[[rating]]", for example: "Rating: [[5]]".'
)
_GENERAL = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
    "the user question displayed below. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of the response."
)
_MATH = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
    "the user question displayed below. Your evaluation should consider correctness and helpfulness. You will "
    "be given a reference answer and the assistant's answer."
)

SINGLE_V1 = (
    f"[Instruction]\n{_GENERAL} Begin your evaluation by providing a short explanation. Be as objective as "
    f"possible. {_RATE}\n\n[Question]\n{{question}}\n\n[The Start of Assistant's Answer]\n{{answer}}\n"
    "[The End of Assistant's Answer]"
)
SINGLE_MATH_V1 = (
    f"[Instruction]\n{_MATH} Begin your evaluation by comparing the assistant's answer with the "
    "reference answer. Identify and correct any mistakes. Be as objective as possible. "
    f"{_RATE}\n\n[Question]\n{{question}}\n\n[The Start of Reference Answer]\n{{ref_answer_1}}\n"
    "[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]"
)
MULTI_TURN_SYSTEM = (
    f"{_GENERAL} You evaluation should focus on the assistant's answer to the second user question. "
    "Begin your evaluation by providing a short explanation. Be as objective as possible. "
    f"{_RATE}\n\n"
)
MULTI_TURN_MATH_SYSTEM = (
    f"{_MATH} You evaluation should focus on the assistant's answer to the second question. "
    "Begin your evaluation by comparing the assistant's answer with the reference answer. "
    f"Identify and correct any mistakes. Be as objective as possible. {_RATE}\n\n"
)
CONVERSATION = (
    "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### Assistant A:\n"
    "{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
    "<|The End of Assistant A's Conversation with User|>"
)
REFERENCE_CONVERSATION = (
    "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n"
    "{ref_answer_1}\n\n### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n"
    "<|The End of Reference Answer|>\n\n\n"
)

_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


@dataclasses.dataclass(frozen=True)
class Question:
    row: int
    question_id: Any
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None


def is_mtbench_row(raw: Any) -> bool:
    return isinstance(raw, dict) and "turns" in raw


def read_questions(path: str) -> list[Question]:
    """Every row as a `Question`; a row without two non-empty string `turns` is a one-line error naming it."""
    out = []
    for row, raw in iter_raw_rows(path):
        where = f"{path}: row {row}"
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object (an MT-Bench question)")
        turns = raw.get("turns")
        if turns is None:
            raise DataError(f"{where}: no 'turns' field (an MT-Bench question needs its two user turns)")
        if not isinstance(turns, list) or len(turns) != 2 or not all(isinstance(t, str) and t.strip() for t in turns):
            raise DataError(f"{where}: field 'turns': expected two non-empty strings, got {str(turns)[:80]!r}")
        ref = raw.get("reference")
        if ref is not None and (not isinstance(ref, list) or not all(isinstance(t, str) for t in ref)):
            raise DataError(f"{where}: field 'reference': expected a list of strings")
        out.append(
            Question(
                row=row,
                question_id=raw.get("question_id", row),
                category=str(raw.get("category", "general")),
                turns=tuple(turns),
                reference=tuple(ref) if ref else None,
            )
        )
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def judge_messages(q: Question, answers: tuple[str, str], turn: int) -> list[dict]:
    """The chat messages asking for a 1–10 rating of the answer to `turn` (1 or 2), FastChat's prompt structure."""
    with_ref = q.category in NEED_REF_CATEGORIES and q.reference is not None and len(q.reference) >= turn
    if turn == 1:
        template = SINGLE_MATH_V1 if with_ref else SINGLE_V1
        user = template.format(question=q.turns[0], answer=answers[0], ref_answer_1=q.reference[0] if with_ref else "")
        return [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": user}]
    fields = {"question_1": q.turns[0], "question_2": q.turns[1], "answer_1": answers[0], "answer_2": answers[1]}
    if with_ref:
        user = REFERENCE_CONVERSATION.format(
            ref_answer_1=q.reference[0], ref_answer_2=q.reference[1], **fields
        ) + CONVERSATION.format(**fields)
        return [{"role": "system", "content": MULTI_TURN_MATH_SYSTEM}, {"role": "user", "content": user}]
    return [
        {"role": "system", "content": MULTI_TURN_SYSTEM},
        {"role": "user", "content": CONVERSATION.format(**fields)},
    ]


def parse_rating(reply: str) -> float | None:
    """FastChat's reading: the first [[x]], else the first [x]; None when there is no rating."""
    match = _RATING.search(reply) or _RATING_BACKUP.search(reply)
    return float(match.group(1)) if match else None


def scores(judgements: list[dict]) -> dict:
    """[{category, turn, rating | None}] → {score, turn_1, turn_2, categories: {category: score}, rated, unrated}."""
    rated = [j for j in judgements if j.get("rating") is not None]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else None

    categories = sorted({j["category"] for j in rated})
    return {
        "score": mean(j["rating"] for j in rated),
        "turn_1": mean(j["rating"] for j in rated if j["turn"] == 1),
        "turn_2": mean(j["rating"] for j in rated if j["turn"] == 2),
        "categories": {c: mean(j["rating"] for j in rated if j["category"] == c) for c in categories},
        "rated": len(rated),
        "unrated": len(judgements) - len(rated),
    }
