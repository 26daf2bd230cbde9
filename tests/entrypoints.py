"""What the end-to-end tests share: running an entry point in a subprocess with its own simulated device count,
reading its JSON summary and the losses it logged, and a free localhost port for multi-process runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# The tests' programs are tiny: compiling them costs more than running them, and LLVM's optimizations are most of
# a compile (measured: -42% CPU for tests/train/test_dpo_step.py + test_memory_levers.py, -21% for an 8-step
# train_rm). XLA's HLO passes (fusion, sharding) still run; only the generated machine code is unoptimized. Results
# are IEEE arithmetic either way (the last bit may differ from -O2, so a test compares runs made under these flags,
# never with a number recorded elsewhere). The embedded defaults' runs, whose figures the docs quote, and the
# benchmarks, whose timings they quote, run without it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def env_with(devices: int, **extra: str) -> dict:
    """The environment of a subprocess on `devices` simulated CPU devices (plus `extra` variables)."""
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        **extra,
    )


def entry_cmd(module: str, out: Path, data: Path, *extra: str) -> list[str]:
    """`python -m starling_jax.<module> output_dir=OUT data.train=DATA ...`."""
    return [sys.executable, "-m", f"starling_jax.{module}", f"output_dir={out}", f"data.train={data}", *extra]


def summary(stdout: str) -> dict:
    """The JSON summary: an entry point's last printed line."""
    return json.loads(stdout.strip().splitlines()[-1])


def run_entry(cmd: list[str], devices: int = 1, timeout: int = 600) -> dict:
    """Runs `cmd` to completion (exit 0 asserted) → its JSON summary."""
    proc = subprocess.run(cmd, env=env_with(devices), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return summary(proc.stdout)


def run_module_in(cwd: Path, module: str, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """`python -m starling_jax.<module> ARGS` in `cwd` on one CPU device, as a user runs it (the test's device count
    dropped; this checkout first on the path) → the finished process (exit code not checked)."""
    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    )
    env["XLA_FLAGS"] = TEST_XLA_FLAGS
    cmd = [sys.executable, "-m", f"starling_jax.{module}", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def losses(out: Path) -> dict[int, float]:
    """step → loss from `metrics.jsonl` (a resumed run rewrites later steps: the newest row wins)."""
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row["loss"]
    return rows


def kill_after_metrics(
    cmd: list[str], out: Path, rows: int, timeout: float = 400, devices: int = 1, checkpoint: int | None = None
) -> None:
    """Starts `cmd` on `devices` simulated devices and SIGKILLs it as soon as `out/metrics.jsonl` has `rows` rows and,
    if given, the checkpoint of step `checkpoint` is complete (orbax renames its folder into place when it is)
    (asserting it was still running): a run killed mid-training, past a checkpoint."""
    proc = subprocess.Popen(cmd, env=env_with(devices), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = out / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (
            metrics.is_file()
            and len(metrics.read_text().splitlines()) >= rows
            and (checkpoint is None or (out / "checkpoints" / str(checkpoint)).is_dir())
        ):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
