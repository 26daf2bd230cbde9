"""Test session set-up: 8 simulated CPU devices (a small pod) and unoptimized machine code for the tiny test
programs (tests/entrypoints.py `TEST_XLA_FLAGS`), before JAX is imported anywhere; the embedded defaults' runs,
trained once per session for the tests that need them."""

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from tests.entrypoints import TEST_XLA_FLAGS  # noqa: E402  (standard library only: JAX is not imported yet)

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in flags:
    flags += " " + TEST_XLA_FLAGS  # why: tests/entrypoints.py
os.environ["XLA_FLAGS"] = flags.strip()
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


# Estimated seconds (one idle core of this 2-core machine, warm compilation cache) of the costly test modules,
# module fixtures included: what the scheduling below balances. Unlisted modules count 40 s per `slow`/`multiprocess`
# test and 2 s per other test. Only the order of the tests depends on these numbers, never a result: refresh them
# from a run's `--durations` when a module's cost changes a lot (BENCHMARKS.md, "CI time").
MODULE_SECONDS = {
    "tests/train/test_default_run.py": 300,
    "tests/train/test_train_rm.py": 420,
    "tests/train/test_cloud_storage.py": 300,
    "tests/train/test_train_dpo.py": 250,
    "tests/rl/test_train_ppo.py": 200,
    "tests/test_benchmarks.py": 400,
    "tests/train/test_trainer_contract.py": 250,
    "tests/rl/test_grpo.py": 200,
    "tests/test_onpolicy.py": 200,
    "tests/train/test_train_sft.py": 150,
    "tests/data/test_pipeline.py": 100,
}
DEFAULT_RUNS_SECONDS = 420  # the `default_runs` fixture: the embedded defaults trained once


def _is_heavy(module: str, items: list) -> bool:
    return module in MODULE_SECONDS or any(
        i.get_closest_marker("slow") or i.get_closest_marker("multiprocess") for i in items
    )


def _module_seconds(module: str, items: list) -> float:
    if module in MODULE_SECONDS:
        return MODULE_SECONDS[module]
    heavy = sum(bool(i.get_closest_marker("slow") or i.get_closest_marker("multiprocess")) for i in items)
    return 40.0 * heavy + 2.0 * (len(items) - heavy)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Orders the tests for `-n N --dist worksteal` (the README's command). worksteal hands worker i the i-th of N
    slices of this list with equal test counts, and an idle worker takes the back half of another's remaining
    slice. So: the modules stay whole (their module fixtures, e.g. tests/train/test_train_rm.py's shared runs, run
    once); the costly ones (end-to-end runs) are dealt into N slices of about equal estimated cost, longest first,
    each to the cheapest slice so far; then the quick modules fill the slices up to their test counts. Each slice
    runs its costly modules first, longest first, so the long runs start at once on every worker and what is left
    to steal at the end is quick. The tests that read the session's `default_runs` go together at the head of the
    first slice (the worker that trains the defaults runs them; another worker would wait on the lock).
    Deterministic (every xdist worker must collect the same order); without xdist: costly modules first."""
    workers = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), 1)
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(Path(os.path.relpath(item.path, config.rootpath)).as_posix(), []).append(item)
    defaults_unit, defaults_seconds = [], float(DEFAULT_RUNS_SECONDS)
    heavy, light = [], []
    for module, module_items in modules.items():
        if any("default_runs" in getattr(i, "fixturenames", ()) for i in module_items):
            defaults_unit += module_items
            defaults_seconds += _module_seconds(module, module_items)
        else:
            unit = (_module_seconds(module, module_items), module, module_items)
            (heavy if _is_heavy(module, module_items) else light).append(unit)
    slices: list[list] = [[] for _ in range(workers)]
    costs = [0.0] * workers
    if defaults_unit:
        slices[0].append((defaults_seconds, "", defaults_unit))
        costs[0] += defaults_seconds
    for unit in sorted(heavy, key=lambda u: (-u[0], u[1])):
        cheapest = min(range(workers), key=lambda i: (costs[i], i))
        slices[cheapest].append(unit)
        costs[cheapest] += unit[0]
    # the test counts worksteal gives each worker: len // N to the first, then the rest likewise
    targets, left = [], len(items)
    for i in range(workers):
        targets.append(left // (workers - i))
        left -= targets[-1]
    counts = [sum(len(u[2]) for u in part) for part in slices]
    for unit in sorted(light, key=lambda u: (-len(u[2]), u[1])):
        i = next((i for i in range(workers) if counts[i] < targets[i]), workers - 1)
        slices[i].append(unit)
        counts[i] += len(unit[2])
    items[:] = [
        item for part in slices for _, _, unit_items in sorted(part, key=lambda u: -u[0]) for item in unit_items
    ]


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
