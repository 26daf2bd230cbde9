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

import sys

from starling_jax import cli
from starling_jax.judge.labelling import label
from starling_jax.judge.spec import JUDGE_KINDS, parse_judge  # noqa: F401 (label.X)


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
