"""The benchmarks' quick modes run end to end and end with their JSON summary (no thresholds: timings on a
shared CI machine are not comparable; the numbers live in BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, monkeypatch, capsys) -> dict:
    """`bench/SCRIPT --quick` by its `main` in this process (the whole script but its `__main__` line: its set-up,
    code path, table and JSON line) without a new process's imports of jax, torch and trl (10-15 s of CPU each;
    tests/sample/test_bench_rollout.py runs a bench script as a process). The script's `sys.path` entries and the
    bench modules it imports (`import rm_step`, `import dpo_nectar`) are undone after, and so is any environment
    variable it (or transformers' Trainer) sets."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before, environ = set(sys.modules), dict(os.environ)
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", ROOT / "bench" / script)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        assert module.main(["--quick"]) == 0
    finally:
        for name in set(sys.modules) - before:
            if Path(getattr(sys.modules[name], "__file__", None) or "").parent == ROOT / "bench":
                del sys.modules[name]
        os.environ.clear()
        os.environ.update(environ)
    out = capsys.readouterr().out
    assert "\n|---|" in out  # the table
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_rm_nectar_quick(monkeypatch, capsys):
    s = _run("rm_nectar.py", monkeypatch, capsys)
    assert s["status"] == "ok" and s["speedup"] > 0 and s["speedup_vs_listwise"] > 0
    assert 0.5 < s["padding_efficiency"] <= 1.0 and 0.3 < s["prefix_token_ratio"] < 1.0


@pytest.mark.slow
def test_rm_step_quick(monkeypatch, capsys):
    s = _run("rm_step.py", monkeypatch, capsys)
    assert s["status"] == "ok" and s["speedup"] > 0 and s["attention"] == "blockwise"


# Slow, like the other benchmark smoke tests: three XLA compiles, four trl updates of a few hundred tokens; in this
# process (jax, torch and trl imported once) 122 s under load 8.
@pytest.mark.slow
def test_dpo_nectar_quick(monkeypatch, capsys):
    s = _run("dpo_nectar.py", monkeypatch, capsys)
    assert s["status"] == "ok" and s["speedup"] > 0 and s["speedup_pairwise"] > 0
    assert s["prompts_per_s"] > 0 and s["trl_prompts_per_s"] > 0
    for system, (first, last) in s["loss"].items():  # both systems trained: finite losses, the 2nd update's differs
        assert np.isfinite(first) and np.isfinite(last) and first != last, (system, first, last)
    # at initialization every implied reward is 0: sigmoid DPO's first loss is log 2 on both sides
    assert s["loss"]["kwise_trl"][0] == pytest.approx(np.log(2), abs=1e-4)
    assert s["loss"]["pairwise_ours"][0] == pytest.approx(np.log(2), abs=1e-4)
    assert s["loss"]["kwise_ours"][0] == pytest.approx(np.log(5040), abs=1e-3)  # Plackett-Luce: 1 / 7! orderings


# Slow, like the other benchmark smoke tests: the sampler's and the update's XLA compiles, four trl iterations;
# 43 s under load 8 after test_dpo_nectar_quick in the same process.
@pytest.mark.slow
def test_grpo_quick(monkeypatch, capsys):
    s = _run("grpo.py", monkeypatch, capsys)
    assert s["status"] == "ok" and s["speedup"] > 0 and s["iteration_s"] > 0 and s["trl_iteration_s"] > 0
    for system, losses in s["loss"].items():  # both systems ran two updates with finite losses
        assert len(losses) == 2 and np.all(np.isfinite(losses)), (system, losses)
    # first update: the policy is its own old policy and reference (ratio 1, KL 0), and group-normalized
    # advantages average to 0 per prompt: both systems' first GRPO loss is 0
    assert s["loss"]["ours"][0] == pytest.approx(0.0, abs=1e-5) and s["loss"]["trl"][0] == pytest.approx(0.0, abs=1e-5)
