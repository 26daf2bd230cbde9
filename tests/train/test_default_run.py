"""The embedded default (`python -m starling_jax.train_rm`, no arguments) learns the synthetic ranking task, and
the task is only learnable from prompt and answer together: the same run with every prompt replaced by one
constant prompt (what a mask hiding the prompt from the answer amounts to) stays at chance.

The chain reads the full default (500 steps), trained once per session (`default_runs` in tests/conftest.py); the
constant-prompt run stops at
300 steps to spare CI time: the real data reaches 0.78 held-out pairwise accuracy by then (measured, 300-step
schedule), the constant prompt stays at chance (BENCHMARKS.md: still 0.51 after
1500 steps). Hence `slow`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from starling_jax.data.synthetic import bundled_path

pytestmark = pytest.mark.slow


def start_module(module: str, *args: str, cwd: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)  # as a user starts it: one CPU device
    return subprocess.Popen(
        [sys.executable, "-m", f"starling_jax.{module}", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, expect: int = 0) -> tuple[dict, str]:
    stdout, stderr = proc.communicate(timeout=1200)
    assert proc.returncode == expect, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1]), stderr


def run_module(module: str, *args: str, cwd: Path | None = None, expect: int = 0) -> tuple[dict, str]:
    return finish(start_module(module, *args, cwd=cwd), expect)


def run_default(out: Path, *overrides: str) -> dict:
    return run_module("train_rm", f"output_dir={out}", "train.progress_bar=false", *overrides)[0]


def test_embedded_defaults_chain_with_no_arguments(tmp_path, default_runs, default_summaries):
    """Every entry point with no arguments: train_rm trains the demo model (≥ 0.85 held-out pairwise accuracy),
    then export_hf, score and verify_hf work on what it wrote; prepare_data prepares the bundled data. The runs are
    the session's `default_runs` (a user's first `train_ppo` in an empty folder, which runs `train_rm` and
    `train_sft` with no arguments first), so the suite trains the defaults once."""
    # before any run, the consumers say what to do in one line
    summary, err = run_module("export_hf", cwd=tmp_path, expect=2)
    assert "run `python -m starling_jax.train_rm` first" in err and summary["status"] == "error"

    summary = default_summaries["rm"]  # train_rm's own summary line, from its log
    assert summary["status"] == "completed" and summary["steps"] > 0
    assert Path(summary["output_dir"]).name == "rm_default"
    assert summary["eval_pairwise_accuracy"] >= 0.85, summary
    assert summary["eval_top1_accuracy"] > 0.5 and summary["eval_kendall_tau"] > 0.6, summary
    by_rank = summary["eval_mean_reward_by_rank"]
    assert by_rank["1"] > by_rank["4"] > by_rank["7"]  # mean reward falls with the rank
    run = default_runs / "runs" / "rm_default"
    assert (run / "hf" / "config.json").is_file() and (run / "summary.png").stat().st_size > 10_000

    # the consumers only read what train_rm wrote: run them side by side, in a copy of the folder (the session's
    # other tests read the runs too)
    shutil.copytree(run, tmp_path / "runs" / "rm_default", symlinks=True)
    consumers = {m: start_module(m, cwd=tmp_path) for m in ("export_hf", "score", "verify_hf", "prepare_data")}
    (exported, _), (scored, _), (verified, _), (prepared, _) = (finish(p) for p in consumers.values())
    assert (tmp_path / exported["output_dir"] / "model.safetensors").is_file()
    assert scored["pairwise_accuracy"] >= 0.85, scored  # the HF export on the bundled file (train + eval rows)
    assert verified["passed"] and verified["max_abs_score_diff"] < 1e-4, verified
    assert prepared["rows_kept"] == 3000 and (tmp_path / "runs" / "prepared_default" / "report.json").is_file()


def test_hiding_the_prompt_makes_the_task_unlearnable(tmp_path):
    rows = [json.loads(line) for line in bundled_path().read_text().splitlines()]
    for r in rows:
        r["prompt"] = "\n\nHuman: Write a short line.\n\nAssistant:"
    data = tmp_path / "no_prompt.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # one constant prompt puts every row in the same split: hold out with an explicit eval file instead
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    lines = data.read_text().splitlines(keepends=True)
    train.write_text("".join(lines[:2700]))
    held_out.write_text("".join(lines[2700:]))
    summary = run_default(
        tmp_path / "run",
        f"data.train={train}",
        f"data.eval={held_out}",
        "export.hf=false",
        "export.plot=false",
        "train.steps=300",
    )
    assert summary["eval_pairwise_accuracy"] < 0.6, summary
