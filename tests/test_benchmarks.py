"""The benchmarks' quick modes run end to end and end with their JSON summary (no thresholds: timings on a
shared CI machine are not comparable; the numbers live in BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
