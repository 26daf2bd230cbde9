"""`label`'s library function: read unranked Nectar-schema rows, rank every row's answers with a judge (`rm:DIR`
through `rm_judge.py`, `openai:MODEL` through `llm.py`), write the labelled Nectar rows, the rejects and (with
`audit`) the positional-bias audit, and return the JSON summary. `python -m starling_jax.label` (its docstring
describes the flags and outputs) and the on-policy rounds (`rounds/`) call it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from starling_jax.data.nectar import ReadReport
from starling_jax.errors import ConfigError, DataError
from starling_jax.judge.rows import nectar_row, read_rows
from starling_jax.judge.spec import parse_judge


def write_jsonl(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # a killed run never leaves a half-written output


def label(
    input: str,
    output: str,
    judge: str,
    *,
    base_url: str | None = None,
    judge_template: str | None = None,
    orders: int = 1,
    fixed_order: bool = False,
    seed: int = 0,
    concurrency: int = 4,
    timeout: float = 120.0,
    max_retries: int = 6,
    backoff: float = 1.0,
    max_attempts: int = 3,
    max_tokens: int | None = None,
    cache: str | None = None,
    rejects: str | None = None,
    audit: bool = False,
    on_bad_row: str = "error",
    template: str | None = None,
    max_length: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    kind, name = parse_judge(judge)
    if orders < 1:
        raise ConfigError(f"--orders {orders}: must be ≥ 1")
    if fixed_order and orders != 1:
        raise ConfigError("--fixed-order shows the answers in input order, so it takes --orders 1 only")
    if max_attempts < 1 or max_retries < 0 or concurrency < 1:
        raise ConfigError("--max-attempts and --concurrency must be ≥ 1, --max-retries ≥ 0")
    if kind == "rm" and (base_url or judge_template or orders != 1 or fixed_order or audit):
        raise ConfigError(
            f"--judge {judge}: a reward model takes no --base-url, --judge-template, --orders, "
            "--fixed-order or --audit (it ranks by reward, in one pass)"
        )
    out_path = Path(output)
    rejects_path = Path(rejects or f"{output}.rejects.jsonl")
    report = ReadReport()
    rows = list(read_rows(input, on_bad_row, report))
    if not rows:
        raise DataError(f"{input}: no rows to label")
    summary = {"status": "completed", "input": input, "output": output, "judge": judge}
    if kind == "rm":
        from starling_jax.judge.rm_judge import label_rows_rm

        labelled, rejected, used = label_rows_rm(
            rows, name, judge, template=template, max_length=max_length, batch_size=batch_size
        )
        summary["template"] = used
        usage = {"requests": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0, "cached": 0}
        judged = None
    else:
        from tqdm import tqdm

        from starling_jax.judge.cache import Cache
        from starling_jax.judge.llm import label_rows
        from starling_jax.judge.openai_judge import OpenAIJudge
        from starling_jax.judge.prompt import load_template

        tmpl = load_template(judge_template)
        llm = OpenAIJudge(
            name, base_url, timeout=timeout, max_retries=max_retries, backoff_s=backoff, max_tokens=max_tokens
        )
        store = Cache(cache or f"{output}.cache.jsonl")
        total = len(rows) if fixed_order else len(rows) * orders
        try:
            with tqdm(total=total, desc="label", unit="order", file=sys.stderr, disable=not progress) as bar:
                labelled, rejected, judged = label_rows(
                    rows,
                    llm,
                    judge,
                    tmpl,
                    store,
                    orders=orders,
                    seed=seed,
                    fixed_order=fixed_order,
                    concurrency=concurrency,
                    max_attempts=max_attempts,
                    progress=bar,
                )
        finally:
            store.close()
        usage = {k: getattr(llm.usage, k) for k in ("requests", "retries", "prompt_tokens", "completion_tokens")}
        usage["cached"] = sum(r.cached for results in judged.values() for r in results)
        summary.update(
            {
                "judge_template": tmpl.name,
                "orders": 1 if fixed_order else orders,
                "fixed_order": fixed_order,
                "seed": seed,
                "cache": str(store.path),
            }
        )
    write_jsonl(out_path, [nectar_row(row, ranks, **record) for row, ranks, record in labelled])
    write_jsonl(rejects_path, rejected)
    summary.update(
        {
            "rows": report.rows_read,
            "labelled": len(labelled),
            "rejected": len(rejected),
            "skipped": report.rows_skipped,
            **usage,
            "rejects": str(rejects_path),
        }
    )
    if audit:
        from starling_jax.judge.audit import audit as audit_fn

        result = audit_fn(judged, labelled)
        audit_path = Path(f"{output}.audit.json")
        audit_path.write_text(json.dumps(result, indent=1) + "\n")
        summary["audit"] = result
    return summary
