"""Rank every row's answers with a judge and write Nectar rows.

    python -m starling_jax.label --input FILE --output FILE --judge SPEC [--base-url URL]
        [--judge-template FILE] [--orders N] [--fixed-order] [--seed S] [--concurrency C] [--timeout S]
        [--max-retries N] [--max-attempts N] [--max-tokens N] [--cache FILE] [--rejects FILE] [--audit]
        [--on-bad-row error|skip] [--template NAME] [--max-length N] [--batch-size N]

Input: unranked Nectar-schema rows (an HH `prompt`, `answers: [{answer, model}]`; `gather_answers` writes them; a
`rank` already there is ignored). Output: the same rows with `rank` 1..K on every answer (1 = best, ties equal),
`model` kept, and per row `judge`, `orders` (the answer indices in the order shown, per order), `rankings`
(answer indices best-first, per order), `aggregation` and `agreement` (mean Kendall τ between the orders'
rankings; null for one order). `prepare_data`, `train_rm` and `score` read them as they are.

Judges (`--judge`):
- `openai:MODEL`: an OpenAI-compatible chat-completions server (`--base-url`, default OpenAI's) through the
  `openai` client; the key comes from OPENAI_API_KEY only. The Nectar procedure: each order is a seeded shuffle of
  the row's answers, shown verbatim as A, B, C, ... in the judge template (`--judge-template`, default the shipped
  helpfulness-and-harmlessness rubric `starling_jax/resources/judge_nectar.txt`), every pair of letters is listed
  in a random order before the request for one final ranking `[['C', 'A', ...]]`, at temperature 0; the reply is
  mapped back through the order. `--orders N` judges each row under N orders (for N ≤ K each answer is shown at
  each position at most once) and aggregates them by a Borda count (mean position; `judge/aggregate.py`).
  `--fixed-order` shows the answers in input order instead (one order; for measuring a judge's bias).
  Failures: 429, 5xx, timeouts and dropped connections are retried with backoff (`--max-retries`); a reply that is
  not a permutation of the letters is re-asked up to `--max-attempts` requests; a row still without a ranking goes
  to the rejects file (`--rejects`, default OUTPUT.rejects.jsonl) with the reason. Every answered request is
  appended (fsync'd) to the cache (`--cache`, default OUTPUT.cache.jsonl), keyed by row content, order, judge and
  template: a killed run restarted with the same arguments re-sends nothing already answered.
- `rm:DIR`: a reward model (HF folder or checkpoint) ranks by reward, ties stay ties: exactly the order of
  `python -m starling_jax.score --model DIR`'s rewards (`--template`, `--max-length`, `--batch-size` as there).

`--audit` adds `audit` to the summary and writes OUTPUT.audit.json: how often each shown position was ranked first
(against 1/K), how often the label's best answer was the one shown first, and the agreement between orders.
The last printed line is a JSON summary: rows, labelled, rejected, requests, retries, prompt_tokens,
completion_tokens (the server's `usage`), cached (orders answered from the cache).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from starling_jax import cli
from starling_jax.data.nectar import ReadReport
from starling_jax.errors import ConfigError, DataError
from starling_jax.judge.rows import nectar_row, read_rows
from starling_jax.judge.spec import JUDGE_KINDS, parse_judge  # noqa: F401 (label.X)


def _write_jsonl(path: Path, lines) -> None:
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
    _write_jsonl(out_path, [nectar_row(row, ranks, **record) for row, ranks, record in labelled])
    _write_jsonl(rejects_path, rejected)
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


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m starling_jax.label", description=__doc__)
    parser.add_argument("--input", required=True, help="unranked Nectar-schema rows (jsonl, json, parquet)")
    parser.add_argument("--output", required=True, help="labelled Nectar rows (JSON lines)")
    parser.add_argument("--judge", required=True, help="openai:MODEL or rm:DIR")
    parser.add_argument("--base-url", default=None, help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument(
        "--judge-template",
        default=None,
        help="judge prompt template file (default: the shipped starling_jax/resources/judge_nectar.txt)",
    )
    parser.add_argument("--orders", type=int, default=1, help="orders (shuffles) per row, Borda-aggregated")
    parser.add_argument("--fixed-order", action="store_true", help="show answers in input order (one order)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffles and pair orders")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--max-retries", type=int, default=6, help="retries of a request on 429/5xx/timeouts")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry's wait in seconds (doubles)")
    parser.add_argument("--max-attempts", type=int, default=3, help="requests per order when replies are unusable")
    parser.add_argument("--max-tokens", type=int, default=None, help="reply length limit")
    parser.add_argument("--cache", default=None, help="request cache (default OUTPUT.cache.jsonl)")
    parser.add_argument("--rejects", default=None, help="rejected rows (default OUTPUT.rejects.jsonl)")
    parser.add_argument("--audit", action="store_true", help="measure positional bias and agreement")
    parser.add_argument("--on-bad-row", choices=("error", "skip"), default="error")
    parser.add_argument("--template", default=None, help="rm: chat template (as score --template)")
    parser.add_argument("--max-length", type=int, default=None, help="rm: tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=32, help="rm: sequences per forward pass")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv=None) -> int:
    parser = build_parser()

    def run():
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # usage errors: one line
        cli.setup_logging(args.verbose)
        return label(
            args.input,
            args.output,
            args.judge,
            base_url=args.base_url,
            judge_template=args.judge_template,
            orders=args.orders,
            fixed_order=args.fixed_order,
            seed=args.seed,
            concurrency=args.concurrency,
            timeout=args.timeout,
            max_retries=args.max_retries,
            backoff=args.backoff,
            max_attempts=args.max_attempts,
            max_tokens=args.max_tokens,
            cache=args.cache,
            rejects=args.rejects,
            audit=args.audit,
            on_bad_row=args.on_bad_row,
            template=args.template,
            max_length=args.max_length,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )

    return cli.run_main(run)


if __name__ == "__main__":
    cli.without_torch()
    sys.exit(main())
