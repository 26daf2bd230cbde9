"""`bench/rollout.py --quick` runs end to end (no speed threshold: the benchmark, not a timed test)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_rollout_bench_quick():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "rollout.py"), "--quick"], capture_output=True,
                          text=True, timeout=900, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["speedup"] > 0
    assert summary["greedy_rows_identical"] == 1.0  # same weights, same greedy tokens as transformers
