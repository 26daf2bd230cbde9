"""Unranked rows in, Nectar rows out.

An input row is a Nectar-schema object: an HH `prompt` (parsed as `data/nectar.py` parses it) and `answers`, a list
of at least two objects with a string `answer` and an optional `model`; a `rank` already there is ignored (it is
what `label` replaces). Other fields (`source`, `turns`, `good_natured`, ...) are kept in the output row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from typing import Any

from starling_jax.data.chat import parse_hh
from starling_jax.data.nectar import BadRow, ReadReport, iter_raw_rows, validated_rows

MAX_ANSWERS = 26  # letters A..Z


@dataclasses.dataclass(frozen=True)
class Row:
    row: int  # 1-based row number in the input file
    prompt: str
    answers: tuple[str, ...]
    models: tuple[str, ...]
    extra: dict  # the row's other fields, kept in the output

    @property
    def k(self) -> int:
        return len(self.answers)

    @property
    def content_key(self) -> str:
        """sha256 of the prompt and the answers in input order: what a cached judgement of this row depends on."""
        text = json.dumps([self.prompt, list(self.answers)], ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def validate_unranked(raw: Any, row: int) -> Row:
    """A raw row → `Row`; raises BadRow naming the field."""
    if not isinstance(raw, dict):
        raise BadRow(f"row is {type(raw).__name__}, not an object")
    if "prompt" not in raw or raw["prompt"] is None:
        raise BadRow("field 'prompt' is missing")
    try:
        parse_hh(raw["prompt"])
    except ValueError as e:
        raise BadRow(f"field 'prompt': {e}") from None
    answers = raw.get("answers")
    if hasattr(answers, "tolist"):  # parquet readers give numpy arrays
        answers = answers.tolist()
    if not isinstance(answers, (list, tuple)):
        raise BadRow(
            "field 'answers' is missing"
            if answers is None
            else f"field 'answers' is {type(answers).__name__}, not a list"
        )
    if not 2 <= len(answers) <= MAX_ANSWERS:
        raise BadRow(f"field 'answers' has {len(answers)} entries, 2 to {MAX_ANSWERS} needed")
    texts, models = [], []
    for j, a in enumerate(answers):
        if not isinstance(a, dict):
            raise BadRow(f"field 'answers[{j}]' is {type(a).__name__}, not an object")
        if not isinstance(a.get("answer"), str):
            raise BadRow(f"field 'answers[{j}].answer' is missing or not a string")
        texts.append(a["answer"])
        models.append("" if a.get("model") is None else str(a["model"]))
    extra = {k: v for k, v in raw.items() if k not in ("prompt", "answers")}
    return Row(row=row, prompt=raw["prompt"], answers=tuple(texts), models=tuple(models), extra=extra)


def read_rows(path: str, on_bad_row: str, report: ReadReport) -> Iterator[Row]:
    report.source = str(path)
    yield from validated_rows(iter_raw_rows(path), validate_unranked, path, on_bad_row, report)


def nectar_row(row: Row, ranks, **record) -> dict:
    """The output row: the input's fields, `answers` with `answer`, `model`, `rank` (1 = best, ties equal), and
    `record` (judge, orders, agreement, ...)."""
    out = dict(row.extra)
    out["prompt"] = row.prompt
    out["answers"] = [{"answer": a, "model": m, "rank": r} for a, m, r in zip(row.answers, row.models, ranks)]
    out.update(record)
    return out
