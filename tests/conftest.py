"""Test session set-up: 8 simulated CPU devices (a small pod) before JAX is imported anywhere; the embedded
defaults' runs, trained once per session for the tests that need them."""

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache for the whole session (in-process tests and every entry point they start):
# the end-to-end tests start dozens of processes that compile the same tiny programs. Cache hits change no result
# (the key covers the program, the devices and the flags); a fresh directory per session keeps runs independent.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # pytest-xdist's workers inherit the controller's
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="starling_jax_xla_cache.")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_collection_modifyitems(config, items):
    """Longest first: the embedded-default runs, then the other end-to-end (`slow`/`multiprocess`) tests, then the
    rest, so that pytest-xdist's two workers finish together instead of one running a long test alone at the end."""

    def cost_rank(item) -> int:
        if item.path.name == "test_default_run.py":
            return 0
        return 1 if item.get_closest_marker("slow") or item.get_closest_marker("multiprocess") else 2

    items.sort(key=cost_rank)


def _last_json_line(path: Path) -> dict:
    """The JSON summary of a run's log (its last line that is one JSON object)."""
    for line in reversed(path.read_text(encoding="utf-8").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"{path}: no JSON summary line")


@pytest.fixture(scope="session")
def default_runs(tmp_path_factory) -> Path:
    """A folder holding the embedded defaults' runs, trained once per test session and shared by pytest-xdist's
    workers: `python -m starling_jax.train_ppo` with no arguments in an empty folder trains `runs/rm_default` and
    `runs/sft_default` first (their output kept in `runs/rm_default.log`, `runs/sft_default.log`), then
    `runs/ppo_default`, each with its `hf/` export; exactly what a user's first `train_ppo` does. The first worker to
    ask trains them under a file lock, the other waits (the defaults take about 7 minutes here; training them once
    instead of once per test that needs them is most of the suite's saving). `.summaries` holds each run's summary."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    shared = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    folder = shared / "default_runs"
    folder.mkdir(exist_ok=True)
    with open(shared / "default_runs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (folder / "runs" / "ppo_default" / "hf" / "config.json").is_file():
            env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
            env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
            env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
            proc = subprocess.run(
                [sys.executable, "-m", "starling_jax.train_ppo", "train.progress_bar=false"],
                cwd=folder,
                env=env,
                capture_output=True,
                text=True,
                timeout=3600,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            (folder / "runs" / "ppo_default.summary.json").write_text(proc.stdout.strip().splitlines()[-1])
    return folder


@pytest.fixture(scope="session")
def default_summaries(default_runs) -> dict:
    """The JSON summaries of the three default runs in `default_runs`: {"rm": ..., "sft": ..., "ppo": ...}."""
    runs = default_runs / "runs"
    return {
        "rm": _last_json_line(runs / "rm_default.log"),
        "sft": _last_json_line(runs / "sft_default.log"),
        "ppo": json.loads((runs / "ppo_default.summary.json").read_text()),
    }
