"""The embedded default (`python -m starling_jax.train_rm`, no arguments) learns the synthetic ranking task, and
the task is only learnable from prompt and answer together: the same run with every prompt replaced by one
constant prompt (what a mask hiding the prompt from the answer amounts to) stays at chance.

Each run is the full default (~4 minutes on the 2-core CI machine), hence `slow`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from starling_jax.data.synthetic import bundled_path

pytestmark = pytest.mark.slow


def run_default(out: Path, *overrides: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)  # the default run as a user starts it: one CPU device
    proc = subprocess.run([sys.executable, "-m", "starling_jax.train_rm", f"output_dir={out}",
                           "train.progress_bar=false", *overrides],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_embedded_default_reaches_the_target_accuracy(tmp_path):
    summary = run_default(tmp_path / "run")
    assert summary["status"] == "completed" and summary["steps"] > 0
    assert summary["eval_pairwise_accuracy"] >= 0.85, summary
    assert summary["eval_top1_accuracy"] > 0.5 and summary["eval_kendall_tau"] > 0.6, summary
    by_rank = summary["eval_mean_reward_by_rank"]
    assert by_rank["1"] > by_rank["4"] > by_rank["7"]  # mean reward falls with the rank
    assert (Path(summary["hf_export_dir"]) / "config.json").is_file()
    assert (tmp_path / "run" / "summary.png").stat().st_size > 10_000


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
    summary = run_default(tmp_path / "run", f"data.train={train}", f"data.eval={held_out}", "export.hf=false",
                          "export.plot=false")
    assert summary["eval_pairwise_accuracy"] < 0.6, summary
