"""Nectar readers, row validation, `Ranking`, the prompt-hash split and the report.

Inputs: the Hub dataset `berkeley-nest/Nectar` (`datasets.load_dataset(..., streaming=True)`), or local files
in the same schema (starling.md §1): parquet (streamed by record batch), JSON lines (streamed by line) and JSON
(an array of rows, or a JSON-lines file named `.json`; a JSON array is parsed whole). Rows are numbered from 1
in file order; in a JSON-lines file a row is a line (blank lines are ignored but keep their number).

Validation: `prompt` parses into HH turns (last turn open), `answers` is a list of at least two entries, each an
object with a string `answer` (empty allowed) and a finite numeric `rank`. `on_bad_row="error"` raises a
`DataError` naming file, row and reason at the first bad row; `"skip"` drops it and records it in the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from starling_jax.data.chat import Message, parse_hh
from starling_jax.errors import DataError
from starling_jax.paths import as_path

T = TypeVar("T")

HUB_NAME = "berkeley-nest/Nectar"
ON_BAD_ROW = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class Ranking:
    """One validated row. Answers stay in the row's ORIGINAL order (`best_first()` gives the ranking order)."""

    row: int  # 1-based row number in the input file
    prompt: str  # the HH prompt text (also the split key)
    messages: tuple[Message, ...]  # parsed prompt turns, ending with a user turn
    answers: tuple[str, ...]
    ranks: tuple[float, ...]  # 1 = best; ties equal
    models: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    turns: int = 1
    good_natured: bool | None = None

    @property
    def num_answers(self) -> int:
        return len(self.answers)

    def best_first(self) -> list[int]:
        """Answer indices ordered best-first (stable sort by rank, so ties keep file order)."""
        return sorted(range(len(self.ranks)), key=lambda i: self.ranks[i])

    def tie_groups(self) -> list[list[int]]:
        """Best-first groups of answer indices sharing a rank."""
        groups: list[list[int]] = []
        for i in self.best_first():
            if groups and self.ranks[groups[-1][0]] == self.ranks[i]:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups


class BadRow(ValueError):
    """A row failed validation (reason in the message)."""


# ---------------------------------------------------------------------------------------------- validation


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except OverflowError:  # an integer beyond float range
        return False


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_row(raw: Any, row: int) -> Ranking:
    """Check one raw row (a dict in Nectar schema) and build a `Ranking`; raises BadRow with the reason."""
    if not isinstance(raw, dict):
        raise BadRow(f"row is {type(raw).__name__}, not an object")
    if isinstance(raw.get("prompt"), str) and not _utf8(raw["prompt"]):
        raise BadRow("field 'prompt' holds a lone surrogate (not encodable text)")
    if "prompt" not in raw:
        raise BadRow("field 'prompt' is missing")
    prompt = raw["prompt"]
    if prompt is None:
        raise BadRow("field 'prompt' is null")
    try:
        messages = parse_hh(prompt)
    except ValueError as e:
        raise BadRow(f"field 'prompt': {e}") from None
    answers = raw.get("answers")
    if "answers" not in raw:
        raise BadRow("field 'answers' is missing")
    if not isinstance(answers, (list, tuple)):
        if hasattr(answers, "tolist"):  # numpy arrays from parquet readers
            answers = answers.tolist()
        else:
            raise BadRow(f"field 'answers' is {type(answers).__name__}, not a list")
    if len(answers) < 2:
        raise BadRow(f"field 'answers' has {len(answers)} entries, at least 2 needed")
    texts, ranks, models = [], [], []
    for j, a in enumerate(answers):
        if not isinstance(a, dict):
            raise BadRow(f"field 'answers[{j}]' is {type(a).__name__}, not an object")
        text = a.get("answer")
        if not isinstance(text, str):
            raise BadRow(
                f"field 'answers[{j}].answer' is {'missing' if text is None else type(text).__name__}"
                + ("" if text is None else ", not a string")
            )
        if not _utf8(text):
            raise BadRow(f"field 'answers[{j}].answer' holds a lone surrogate (not encodable text)")
        rank = a.get("rank")
        if rank is None:
            raise BadRow(f"field 'answers[{j}].rank' is missing")
        if not _is_number(rank):
            raise BadRow(f"field 'answers[{j}].rank' is {type(rank).__name__}, not a number")
        if not _finite(rank):
            raise BadRow(f"field 'answers[{j}].rank' is {_short(rank)}, not finite")
        model = a.get("model")
        texts.append(text)
        ranks.append(float(rank))
        models.append("" if model is None else str(model))
    source = raw.get("source")
    if source is None:
        sources: tuple[str, ...] = ()
    elif isinstance(source, str):
        sources = (source,)
    elif isinstance(source, (list, tuple)) or hasattr(source, "tolist"):
        sources = tuple(str(s) for s in list(source))
    else:
        sources = (str(source),)
    gn = raw.get("good_natured")
    n_user = sum(m["role"] == "user" for m in messages)
    turns = raw.get("turns")
    return Ranking(
        row=row,
        prompt=prompt,
        messages=tuple(messages),
        answers=tuple(texts),
        ranks=tuple(ranks),
        models=tuple(models),
        sources=sources,
        turns=int(turns) if _is_number(turns) and _finite(turns) else n_user,
        good_natured=None if gn is None else bool(gn),
    )


# ---------------------------------------------------------------------------------------------- readers

_NOT_JSON = object()


def _decode_line(raw: bytes) -> str | tuple:
    """A line as text, or `(_NOT_JSON, reason)` naming where it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return (_NOT_JSON, f"line is not UTF-8 text: byte 0x{raw[e.start]:02x} at column {e.start + 1}")


def _parse_json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return (_NOT_JSON, f"line is not JSON: {e.msg} (column {e.colno})")
    except (ValueError, RecursionError) as e:  # e.g. nesting too deep, integer too long
        return (_NOT_JSON, f"line is not usable JSON: {type(e).__name__}: {str(e)[:100]}")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Lines are read as bytes and decoded one by one: a line that is not UTF-8 is a bad row naming its column
    (a file that is not text at all fails at its first line), never a UnicodeDecodeError traceback."""
    with path.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            line = _decode_line(raw)
            yield i, line if isinstance(line, tuple) else _parse_json_line(line)


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path.open("rb"))  # a file object: path may be a URL
    except Exception as e:  # noqa: BLE001 - truncated, not parquet, ...
        raise DataError(f"{path}: cannot read parquet file: {_one_line(e)}") from None
    n = 0
    batches = pf.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
            rows = None if batch is None else batch.to_pylist()
        except Exception as e:  # noqa: BLE001 - a corrupt page: the file itself is broken
            raise DataError(f"{path}: parquet file is broken after row {n}: {_one_line(e)}") from None
        if rows is None:
            return
        for r in rows:
            n += 1
            yield n, r


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _iter_jsonl(path)
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}: not UTF-8 text: byte 0x{data[e.start]:02x} at line {line}, column {column}") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: not usable JSON: {_one_line(e)}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: a JSON file must hold an array of rows, not {type(rows).__name__}")
    for i, r in enumerate(rows, start=1):
        yield i, r


def _iter_hub(name: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{name}: cannot load Hub dataset (split {split!r}): {type(e).__name__}: {e}") from e
    for i, r in enumerate(ds, start=1):
        yield i, r


def iter_raw_rows(source: str | Path, split: str = "train") -> Iterator[tuple[int, Any]]:
    """Yield (1-based row number, raw row) from a local file, a URL (`gs://...`) or a Hub dataset name (e.g.
    `berkeley-nest/Nectar`).

    A line that is not JSON is yielded as `(_NOT_JSON, reason)` and counted as a bad row by `read_rankings`.
    """
    p = as_path(source)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".parquet":
            return _iter_parquet(p)
        if suffix in (".jsonl", ".ndjson"):
            return _iter_jsonl(p)
        if suffix == ".json":
            return _iter_json(p)
        raise DataError(f"{p}: unknown file type {suffix!r} (use .parquet, .jsonl or .json)")
    if p.exists():
        raise DataError(f"{p}: is not a file")
    s = str(source)
    if s.count("/") == 1 and not s.startswith((".", "/")) and not Path(s).suffix:
        return _iter_hub(s, split)
    raise DataError(f"{source}: input file not found (and not a Hub dataset name like {HUB_NAME})")


@dataclasses.dataclass
class ReadReport:
    """Counts of a validation pass; `skipped` lists `{"row": N, "reason": "..."}`."""

    source: str = ""
    rows_read: int = 0
    rows_kept: int = 0
    rows_skipped: int = 0
    skipped: list = dataclasses.field(default_factory=list)

    def skip(self, row: int, reason: str) -> None:
        self.rows_skipped += 1
        self.skipped.append({"row": int(row), "reason": reason})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def empty_split_message(
    source, split: str, report: ReadReport | None = None, eval_fraction: float = 0.0, prepared: bool = False
) -> str:
    """Why a split of `source` has no rows, naming the file: it is empty, every row was skipped, or none fell in
    `split` (the eval split held out by prompt hash)."""
    if prepared:
        why = (
            "a prepared dataset: give the eval rows with data.eval, or prepare it again with a larger --eval-fraction"
            if split == "eval"
            else "a prepared dataset: prepare it again (see its report.json)"
        )
    elif report is None:
        why = "no rows"
    elif report.rows_read == 0:
        why = "the file holds no rows"
    elif report.rows_skipped >= report.rows_read:
        why = f"all {report.rows_read} rows were skipped as bad rows (on_bad_row=skip)"
    elif eval_fraction:
        why = (
            f"none of its {report.rows_read} rows fell in the {split} split held out by prompt hash "
            f"(eval_fraction={eval_fraction}): use more rows, a larger eval_fraction, or data.eval=FILE"
        )
    else:
        why = f"{report.rows_read} rows read, {report.rows_skipped} skipped, none left for {split}"
    return f"{source}: the {split} split is empty ({why})"


def read_rankings(
    source: str | Path,
    on_bad_row: str = "error",
    report: ReadReport | None = None,
    split: str = "train",
    rows: Iterable[tuple[int, Any]] | None = None,
) -> Iterator[Ranking]:
    """Stream validated `Ranking`s; bad rows raise (error) or are counted in `report` (skip)."""
    if on_bad_row not in ON_BAD_ROW:
        raise DataError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    report = report if report is not None else ReadReport()
    report.source = str(source)
    yield from validated_rows(
        rows if rows is not None else iter_raw_rows(source, split), validate_row, source, on_bad_row, report
    )


def validated_rows(
    rows: Iterable[tuple[int, Any]], validate: Callable[[Any, int], T], source, on_bad_row: str, report: ReadReport
) -> Iterator[T]:
    """`validate(raw, row)` over raw rows: a row it rejects (BadRow), or a line that is not JSON, raises a DataError
    naming the file and row (on_bad_row=error) or is counted in `report` and passed over (skip)."""
    for row, raw in rows:
        report.rows_read += 1
        try:
            if isinstance(raw, tuple) and raw and raw[0] is _NOT_JSON:
                raise BadRow(raw[1])
            value = validate(raw, row)
        except BadRow as e:
            if on_bad_row == "error":
                raise DataError(f"{source}: row {row}: {e}") from None
            report.skip(row, str(e))
            continue
        report.rows_kept += 1
        yield value


def load_rankings(source, on_bad_row: str = "error", report: ReadReport | None = None) -> list[Ranking]:
    """`read_rankings` into a list (small files)."""
    return list(read_rankings(source, on_bad_row, report))


# ---------------------------------------------------------------------------------------------- pairwise


def read_pairwise(
    source: str | Path, on_bad_row: str = "error", report: ReadReport | None = None, split: str = "train"
) -> Iterator[Ranking]:
    """RewardBench layout (`prompt`, `chosen`, `rejected`) → 2-answer `Ranking`s (chosen rank 1, rejected 2).

    `prompt` may be plain user text or HH text; other columns (`subset`, `id`) go to `sources`.
    """

    def convert():
        for row, raw in iter_raw_rows(source, split):
            if isinstance(raw, dict):
                p = raw.get("prompt")
                if isinstance(p, str) and "\n\nHuman:" not in p and not p.lstrip().startswith("Human:"):
                    p = f"\n\nHuman: {p}\n\nAssistant:"
                src = [str(raw[k]) for k in ("subset", "id") if raw.get(k) is not None]
                raw = {
                    "prompt": p,
                    "answers": [
                        {"answer": raw.get("chosen"), "model": raw.get("chosen_model"), "rank": 1},
                        {"answer": raw.get("rejected"), "model": raw.get("rejected_model"), "rank": 2},
                    ],
                    "source": src,
                }
            yield row, raw

    return read_rankings(source, on_bad_row, report, rows=convert())


# ---------------------------------------------------------------------------------------------- split


def prompt_hash_fraction(prompt: str) -> float:
    """A deterministic number in [0, 1) from the prompt text (sha256)."""
    h = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_of(prompt: str, eval_fraction: float) -> str:
    """ "eval" or "train" by prompt hash: the same prompt always lands in the same split."""
    if not 0.0 <= eval_fraction <= 1.0:
        raise DataError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    return "eval" if prompt_hash_fraction(prompt) < eval_fraction else "train"
