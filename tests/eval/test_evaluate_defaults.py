"""On the embedded default models (`train_sft`, `train_rm`, `train_ppo` with no arguments): `evaluate policy
--judge rm:` ranks the PPO policy above the SFT policy it started from, and best-of-n's reward rises with n with
the analytic KL beside it.

The defaults are the session's `default_runs` (tests/conftest.py: trained once, shared with the other tests that
need them). Hence `slow`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from starling_jax.data.synthetic import bundled_path
from tests.entrypoints import run_module_in, summary

pytestmark = pytest.mark.slow

RUNS = ("runs/sft_default/hf", "runs/rm_default/hf", "runs/ppo_default/hf")


def run_module(cwd: Path, module: str, *args: str) -> tuple[dict, str]:
    done = run_module_in(cwd, module, *args, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    return summary(done.stdout), done.stderr


@pytest.fixture(scope="module")
def defaults(default_runs) -> Path:
    """The embedded defaults (tests/conftest.py trains them once per session), or STARLING_DEFAULT_RUNS_DIR's."""
    cwd = Path(os.environ["STARLING_DEFAULT_RUNS_DIR"]) if os.environ.get("STARLING_DEFAULT_RUNS_DIR") else default_runs
    assert all((cwd / r / "config.json").is_file() for r in RUNS), cwd
    return cwd


def prompts_file(cwd: Path, count: int) -> Path:
    rows = [json.loads(line) for line in bundled_path().read_text().splitlines()[-count:]]
    path = cwd / "eval_prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    return path


def test_rm_judge_ranks_ppo_above_sft_and_bon_rises_with_n(defaults):
    sft, rm, ppo = RUNS
    sampling = ["--max-new-tokens", "24", "--temperature", "1.0", "--batch-size", "32", "--no-plot"]
    summary, table = run_module(
        defaults,
        "evaluate",
        "policy",
        "--model",
        sft,
        "--model",
        ppo,
        "--prompts",
        str(prompts_file(defaults, 64)),
        "--judge",
        f"rm:{rm}",
        "--output-dir",
        "runs/eval/policy",
        *sampling,
    )
    by_model = {row["model_name"]: row for row in summary["models"]}
    assert by_model[ppo]["mean_reward"] > by_model[sft]["mean_reward"], table
    summary, table = run_module(
        defaults,
        "evaluate",
        "bon",
        "--policy",
        sft,
        "--reward-model",
        rm,
        "--n",
        "1,4,16",
        "--prompts",
        str(prompts_file(defaults, 16)),
        "--output-dir",
        "runs/eval/bon",
        *sampling,
    )
    rows = summary["table"]
    assert rows[0]["mean_reward"] < rows[1]["mean_reward"] < rows[2]["mean_reward"], table
    assert [r["kl_analytic"] for r in rows] == [math.log(n) - (n - 1) / n for n in (1, 4, 16)]
    print(json.dumps({"policy": by_model, "bon": rows}))  # the figures the README quotes
