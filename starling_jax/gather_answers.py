"""Gather answers from several sources into unranked Nectar-schema rows (the input of `label`).

    python -m starling_jax.gather_answers --output FILE [--prompts FILE]
        [--generated FILE[=MODEL] ...] [--nectar FILE ...] [--answers FILE[=MODEL] ...]
        [--min-answers N] [--max-answers N] [--dedupe]

Sources (each flag repeatable, read in the order given):
- `--generated FILE[=MODEL]`: `python -m starling_jax.generate` output (one line per completion: `row`, `sample`,
  `completion`); line `row` n answers row n of `--prompts`, the file generate read with `--data`. MODEL names the
  answers (default: the file's stem).
- `--nectar FILE`: Nectar rows (ranked or not): their `answers` (`answer`, `model`) join the row with the same HH
  prompt; their `source` is kept.
- `--answers FILE[=MODEL]`: JSON lines with an HH `prompt` (or `messages`, a role/content list ending with a user
  turn) and `answer` (or `completion`), optionally `model` (else MODEL, else the file's stem).

Rows are joined by their HH prompt text. The output rows are those of `--prompts` in its order, or, without it, each
prompt in the order it is first met; each has `prompt`, `answers: [{answer, model}]` (in source order) and
`source`. `--dedupe` keeps the first of answers with the same text; `--max-answers` keeps the first N; a row left
with fewer than `--min-answers` (default 2) answers is not written (counted in the summary as `rows_too_few`).
The last printed line is a JSON summary: rows, answers, answers per source, rows_too_few.
"""

from __future__ import annotations

import sys

from starling_jax import cli
from starling_jax.judge.gather import gather


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m starling_jax.gather_answers",
        description=__doc__,
    )
    parser.add_argument("--output", required=True, help="unranked Nectar-schema rows (JSON lines)")
    parser.add_argument("--prompts", default=None, help="the prompt file (Nectar rows or messages rows)")
    parser.add_argument(
        "--generated", action="append", default=[], metavar="FILE[=MODEL]", help="generate output (repeatable)"
    )
    parser.add_argument("--nectar", action="append", default=[], metavar="FILE", help="Nectar rows (repeatable)")
    parser.add_argument(
        "--answers",
        action="append",
        default=[],
        metavar="FILE[=MODEL]",
        help="answer file: prompt/messages + answer/completion per line (repeatable)",
    )
    parser.add_argument("--min-answers", type=int, default=2)
    parser.add_argument("--max-answers", type=int, default=None)
    parser.add_argument("--dedupe", action="store_true", help="drop answers whose text an earlier one has")
    return parser


def main(argv=None) -> int:
    parser = build_parser()

    def run():
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # usage errors: one line
        cli.setup_logging()
        return gather(
            args.output,
            args.prompts,
            args.generated,
            args.nectar,
            args.answers,
            min_answers=args.min_answers,
            max_answers=args.max_answers,
            dedupe=args.dedupe,
        )

    return cli.run_main(run)


if __name__ == "__main__":
    cli.without_torch()
    sys.exit(main())
