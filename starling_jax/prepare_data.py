"""Validate + tokenize Nectar once and write a TFDS dataset plus report.json (run off the TPU hosts).

    python -m starling_jax.prepare_data --input FILE_OR_HUB_NAME --output DIR [--tokenizer DIR]
        [--template NAME] [--max-length N] [--on-bad-row error|skip] [--eval-fraction F]

`--input` is a parquet / JSON-lines / JSON file in the Nectar schema or a Hub dataset name
(`berkeley-nest/Nectar`). Without `--tokenizer` the offline Mistral tokenizer from `mistral-common` is used.
Exit code 0 when it finished (also when rows were skipped), 2 when it stopped on a bad row or bad input. The
last printed line is a one-line JSON summary (report counts + `output_dir`, the folder written).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from starling_jax.cli import DEFAULT_MAX_LENGTH, ArgumentParser, run_main
from starling_jax.data.bundled import BUNDLED_ALIAS, resolve_bundled
from starling_jax.data.chat import TEMPLATE_NAMES
from starling_jax.errors import UsageError

MIN_MAX_LENGTH = 8  # as train_rm's data.max_length


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m starling_jax.prepare_data", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--input",
        default=BUNDLED_ALIAS,
        help="Nectar-schema file (.parquet/.jsonl/.json), Hub name (berkeley-nest/Nectar), or "
        "'bundled' (the synthetic file shipped with the package; the default)",
    )
    ap.add_argument("--output", default="runs/prepared_default", help="output folder (TFDS dataset + report.json)")
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="HF tokenizer folder or Hub id, e.g. "
        "meta-llama/Llama-2-7b-chat-hf (default: the offline Mistral v1 tokenizer for the template)",
    )
    ap.add_argument("--template", default="llama2_chat", choices=TEMPLATE_NAMES)
    ap.add_argument(
        "--max-length",
        type=int,
        default=DEFAULT_MAX_LENGTH,
        help=f"tokens per sequence, prompt + answer (default {DEFAULT_MAX_LENGTH}, the embedded train_rm "
        "run's data.max_length; the 7B recipes use 2048)",
    )
    ap.add_argument("--on-bad-row", default="error", choices=("error", "skip"))
    ap.add_argument("--eval-fraction", type=float, default=0.05)
    return ap


def parse_args(argv=None):
    """The flags, checked before anything is read (a usage mistake raises `UsageError`, one line)."""
    args = build_parser().parse_args(argv)
    if args.max_length < MIN_MAX_LENGTH:  # else every row would be "too long" and blamed one by one
        raise UsageError(
            f"--max-length {args.max_length}: must be at least {MIN_MAX_LENGTH} tokens (prompt + answer; "
            f"train_rm's default is {DEFAULT_MAX_LENGTH}, the 7B recipes use 2048)"
        )
    if not 0.0 <= args.eval_fraction < 1.0:
        raise UsageError(f"--eval-fraction {args.eval_fraction}: must be in [0, 1)")
    return args


def run(args) -> dict:
    from starling_jax.data.tokenizer import default_tokenizer_for, load_tokenizer, resolve_tokenizer_dir

    t0 = time.time()
    out = Path(args.output)
    tok_dir = (
        resolve_tokenizer_dir(args.tokenizer, key="--tokenizer")
        if args.tokenizer
        else default_tokenizer_for(args.template)
    )
    tok = load_tokenizer(tok_dir)
    # a re-run replaces the previous dataset
    shutil.rmtree(out / "nectar_tokenized", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    import tensorflow_datasets as tfds

    from starling_jax.data.tfds_nectar import NoRowsKept, make_builder

    tfds.disable_progress_bar()
    b = make_builder(
        resolve_bundled(args.input),
        out,
        tok,
        str(tok_dir),
        args.template,
        args.max_length,
        args.eval_fraction,
        args.on_bad_row,
    )
    try:
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except NoRowsKept:
        write_report(b, args, out, tok_dir, t0)
        raise
    finally:
        b.cleanup()
        shutil.rmtree(out / "downloads", ignore_errors=True)
    return write_report(b, args, out, tok_dir, t0)


def write_report(b, args, out: Path, tok_dir, t0: float) -> dict:
    rep = b.report
    report = {
        "input": str(args.input),
        "output": str(out),
        "dataset_dir": str(b.data_dir),
        "rows_read": rep.rows_read,
        "rows_kept": rep.rows_kept,
        "rows_skipped": rep.rows_skipped,
        "rows_truncated": b.rows_truncated,
        "rows_answer_cut": b.rows_answer_cut,
        "splits": b.split_counts,
        "tokenizer": str(tok_dir),
        "template": args.template,
        "max_length": args.max_length,
        "provenance": b.provenance,
        "eval_fraction": args.eval_fraction,
        "on_bad_row": args.on_bad_row,
        "lengths": b.stats.as_dict(),
        "seconds": round(time.time() - t0, 2),
        "skipped": rep.skipped,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("absl").setLevel(logging.ERROR)
    parsed = {}

    def prepare():
        parsed["args"] = args = parse_args(argv)
        report = run(args)
        summary = {k: report[k] for k in ("rows_read", "rows_kept", "rows_skipped", "rows_truncated", "splits")}
        return {"status": "completed", **summary, "output_dir": report["output"]}

    def on_error():
        return {"output_dir": str(parsed["args"].output) if "args" in parsed else None}

    return run_main(prepare, on_error)


if __name__ == "__main__":
    from starling_jax.cli import without_torch

    without_torch()
    raise SystemExit(main())
