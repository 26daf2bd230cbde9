"""The benchmarks' quick modes run end to end and end with their JSON summary (no thresholds: timings on a
shared CI machine are not comparable; the numbers live in BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one CPU device, as the benchmarks are meant to run
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick"], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_rm_nectar_quick():
    s = _run("rm_nectar.py")
    assert s["status"] == "ok" and s["speedup"] > 0 and s["speedup_vs_listwise"] > 0
    assert 0.5 < s["padding_efficiency"] <= 1.0 and 0.3 < s["prefix_token_ratio"] < 1.0


@pytest.mark.slow
def test_rm_step_quick():
    s = _run("rm_step.py")
    assert s["status"] == "ok" and s["speedup"] > 0 and s["attention"] == "blockwise"


# Slow, like the other benchmark smoke tests: importing jax, torch and trl, three XLA compiles, four trl updates
# of a few hundred tokens; 190 s here under load 10 (1 min 12 s of CPU).
@pytest.mark.slow
def test_dpo_nectar_quick():
    s = _run("dpo_nectar.py")
    assert s["status"] == "ok" and s["speedup"] > 0 and s["speedup_pairwise"] > 0
    assert s["prompts_per_s"] > 0 and s["trl_prompts_per_s"] > 0
    for system, (first, last) in s["loss"].items():  # both systems trained: finite losses, the 2nd update's differs
        assert np.isfinite(first) and np.isfinite(last) and first != last, (system, first, last)
    # at initialization every implied reward is 0: sigmoid DPO's first loss is log 2 on both sides
    assert s["loss"]["kwise_trl"][0] == pytest.approx(np.log(2), abs=1e-4)
    assert s["loss"]["pairwise_ours"][0] == pytest.approx(np.log(2), abs=1e-4)
    assert s["loss"]["kwise_ours"][0] == pytest.approx(np.log(5040), abs=1e-3)  # Plackett-Luce: 1 / 7! orderings


# Slow, like the other benchmark smoke tests: imports, the sampler's and the update's XLA compiles, four trl
# iterations; 152 s here under load 10 (1 min 2 s of CPU).
@pytest.mark.slow
def test_grpo_quick():
    s = _run("grpo.py")
    assert s["status"] == "ok" and s["speedup"] > 0 and s["iteration_s"] > 0 and s["trl_iteration_s"] > 0
    for system, losses in s["loss"].items():  # both systems ran two updates with finite losses
        assert len(losses) == 2 and np.all(np.isfinite(losses)), (system, losses)
    # first update: the policy is its own old policy and reference (ratio 1, KL 0), and group-normalized
    # advantages average to 0 per prompt: both systems' first GRPO loss is 0
    assert s["loss"]["ours"][0] == pytest.approx(0.0, abs=1e-5) and s["loss"]["trl"][0] == pytest.approx(0.0, abs=1e-5)
