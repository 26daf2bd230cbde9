"""`gather_answers`' library function: answers from several sources (`generate` output, Nectar rows, answer files)
joined by HH prompt into unranked Nectar-schema rows, the input of `label`. `python -m starling_jax.gather_answers`
(its docstring describes the sources and the output) and the on-policy rounds (`rounds/`) call it."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from starling_jax.data.chat import parse_hh, to_hh
from starling_jax.data.nectar import iter_raw_rows
from starling_jax.data.prompts import parse_messages, read_prompts
from starling_jax.errors import ConfigError, DataError


def _split_spec(spec: str) -> tuple[str, str]:
    """`FILE=MODEL` → (FILE, MODEL); `FILE` → (FILE, its stem)."""
    path, sep, model = spec.partition("=")
    if sep and not model:
        raise ConfigError(f"{spec!r}: empty model name after '='")
    return path, model if sep else Path(path).stem


def _hh(messages, where: str) -> str:
    if any(m["role"] == "system" for m in messages):
        raise DataError(f"{where}: a system message cannot be written as an HH prompt (Nectar rows have none)")
    return to_hh(messages)


def _rows(path: str):
    """(row, dict) of a JSON file; a line that is not a JSON object is a one-line DataError naming file and row."""
    for row, raw in iter_raw_rows(path):
        if isinstance(raw, tuple):
            raise DataError(f"{path}: row {row}: {raw[1]}")
        if not isinstance(raw, dict):
            raise DataError(f"{path}: row {row}: expected a JSON object, got {type(raw).__name__}")
        yield row, raw


def _prompt_of(raw: dict, where: str) -> str:
    if "messages" in raw and "prompt" not in raw:
        return _hh(parse_messages(raw["messages"], where), where)
    prompt = raw.get("prompt")
    try:
        parse_hh(prompt)
    except ValueError as e:
        raise DataError(f"{where}: field 'prompt': {e}") from None
    return prompt


def gather(
    output: str,
    prompts: str | None = None,
    generated=(),
    nectar=(),
    answers=(),
    *,
    min_answers: int = 2,
    max_answers: int | None = None,
    dedupe: bool = False,
) -> dict:
    if not (generated or nectar or answers):
        raise ConfigError("no sources: give --generated, --nectar or --answers")
    if generated and not prompts:
        raise ConfigError(
            "--generated needs --prompts: the file generate read with --data (its rows are what "
            "generate's `row` numbers refer to)"
        )
    if min_answers < 1 or (max_answers is not None and max_answers < min_answers):
        raise ConfigError("--min-answers must be ≥ 1 and --max-answers ≥ --min-answers")
    order: list[str] = []
    collected: dict[str, list[dict]] = defaultdict(list)
    sources: dict[str, list[str]] = defaultdict(list)
    per_source: dict[str, int] = {}

    def add(prompt: str, answer: str, model: str, where: str):
        if not isinstance(answer, str):
            raise DataError(f"{where}: the answer is not a string")
        if prompt not in collected and prompts is None:
            order.append(prompt)
        collected[prompt].append({"answer": answer, "model": model})

    if prompts:
        conversations = read_prompts(prompts)
        order = [_hh(conv, f"{prompts}: row {i + 1}") for i, conv in enumerate(conversations)]
        for index, (_, raw) in enumerate(_rows(prompts)):  # keep the prompt file's own `source`
            if isinstance(raw.get("source"), (list, str)):
                sources[order[index]] += [raw["source"]] if isinstance(raw["source"], str) else list(raw["source"])
    for spec in generated:
        path, model = _split_spec(spec)
        count = 0
        for row, raw in _rows(path):
            where = f"{path}: row {row}"
            n = raw.get("row")
            if not isinstance(n, int) or not 1 <= n <= len(order):
                raise DataError(
                    f"{where}: field 'row' is {n!r}, not a row of --prompts {prompts} "
                    f"(1..{len(order)}); was it generated from another file?"
                )
            add(order[n - 1], raw.get("completion"), model, where)
            count += 1
        per_source[spec] = count
    for path in nectar:
        count = 0
        for row, raw in _rows(path):
            where = f"{path}: row {row}"
            prompt = _prompt_of(raw, where)
            listed = raw.get("answers")
            if not isinstance(listed, list):
                raise DataError(f"{where}: field 'answers' is not a list")
            for j, a in enumerate(listed):
                if not isinstance(a, dict):
                    raise DataError(f"{where}: field 'answers[{j}]' is not an object")
                add(
                    prompt, a.get("answer"), "" if a.get("model") is None else str(a["model"]), f"{where}: answers[{j}]"
                )
                count += 1
            src = raw.get("source")
            if isinstance(src, (list, str)):
                sources[prompt] += [src] if isinstance(src, str) else list(src)
        per_source[path] = count
    for spec in answers:
        path, default_model = _split_spec(spec)
        count = 0
        for row, raw in _rows(path):
            where = f"{path}: row {row}"
            text = raw.get("answer", raw.get("completion"))
            add(_prompt_of(raw, where), text, str(raw.get("model") or default_model), where)
            count += 1
        per_source[spec] = count

    out_rows, too_few, written = [], 0, 0
    for prompt in order:
        got = collected.get(prompt, [])
        if dedupe:
            seen: set[str] = set()
            got = [a for a in got if not (a["answer"] in seen or seen.add(a["answer"]))]
        if max_answers:
            got = got[:max_answers]
        if len(got) < min_answers:
            too_few += 1
            continue
        row = {"prompt": prompt, "answers": got}
        if sources.get(prompt):
            row["source"] = list(dict.fromkeys(sources[prompt]))
        out_rows.append(row)
        written += len(got)
    unmatched = [p for p in collected if p not in set(order)]
    if unmatched:
        raise DataError(f"{len(unmatched)} answer prompt(s) are not in --prompts {prompts}, e.g. {unmatched[0][:80]!r}")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        for row in out_rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {
        "status": "completed",
        "output": output,
        "rows": len(out_rows),
        "answers": written,
        "answers_per_source": per_source,
        "rows_too_few": too_few,
    }
