"""`bench/rollout.py --quick` runs end to end (no speed threshold: the benchmark, not a timed test)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_rollout_bench_quick():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "rollout.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["speedup"] > 0
    assert summary["greedy_rows_identical"] == 1.0  # same weights, same greedy tokens as transformers


@pytest.mark.slow
def test_rollout_bandwidth_quick_counts_every_weight_and_the_kv_cache(monkeypatch, capsys):
    """The bandwidth mode's bytes per step: every parameter (counted here from the shape by hand) plus the keys
    and values the sampler's cache holds (2 · layers · batch · KV heads · (prompt + new - 1) · head dim, bf16)."""
    # by the script's `main` in this process (the counting is what is tested; the test above runs the script as a
    # process): no second process's imports. The script's `sys.path` entry is undone after (monkeypatch).
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("bench_rollout", ROOT / "bench" / "rollout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--bandwidth", "--quick", "--peak-gbs", "100"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    v, d, f, layers, h, g = 32000, 64, 128, 2, 4, 2
    dh = d // h
    per_layer = d * h * dh + 2 * d * g * dh + h * dh * d + 3 * d * f + 2 * d
    params = 2 * v * d + layers * per_layer + d  # embedding, untied LM head, layers, final norm
    assert s["params"] == params
    for row in s["rows"]:
        kv_bytes = 2 * layers * row["batch"] * g * (s["prompt"] + s["new_tokens"] - 1) * dh * 2
        assert row["bytes_per_step"] == 2 * params + kv_bytes
        assert row["hbm_fraction"] == pytest.approx(row["gbs"] / 100, rel=1e-9)
    assert [r["batch"] for r in s["rows"]] == [1, 2] and s["speedup"] > 0
