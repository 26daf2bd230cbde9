"""launch/slurm.sh and SLURM multi-process initialization: the sbatch/srun commands of a dry run, what runs inside an
allocation (a fake `srun` on PATH), usage errors, the XLA GPU flags parse in this jaxlib, and two processes started
with SLURM's environment join one JAX run."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from starling_jax import cli
from starling_jax.errors import ConfigError
from tests.entrypoints import free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "slurm.sh"


def clean_env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STARLING_SLURM_", "SLURM_")) and k not in ("DRY_RUN", "XLA_FLAGS")
    }
    env.update(extra)
    return env


def slurm(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env or clean_env(), capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def test_dry_run_submits_itself_and_runs_one_process_per_node():
    out = slurm(
        "--dry-run",
        "--nodes",
        "2",
        "--partition",
        "gpu",
        "--time",
        "24:00:00",
        "configs/rm_mistral7b_nectar.yaml",
        "train.steps=100",
    )
    assert out.returncode == 0, out.stderr
    sbatch, srun = commands(out.stdout)
    assert sbatch[:5] == [
        "sbatch",
        "--job-name=starling_jax-train_rm",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
    ]
    assert "--partition=gpu" in sbatch and "--time=24:00:00" in sbatch
    assert f"--export=ALL,STARLING_SLURM_REPO={ROOT}" in sbatch and f"--chdir={ROOT}" in sbatch
    script = sbatch.index(str(SCRIPT))
    assert sbatch[script + 1 :] == [
        "--gpus-per-node",
        "8",
        "--job",
        "train_rm",
        "--venv",
        str(ROOT / ".venv"),
        "--",
        "configs/rm_mistral7b_nectar.yaml",
        "train.steps=100",
    ]
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", f"--chdir={ROOT}"]
    env_at = srun.index("env")
    assert srun[env_at + 1] == "STARLING_JAX_DISTRIBUTED=slurm"
    assert srun[env_at + 2].startswith("XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true")
    assert srun[env_at + 3 :] == [
        str(ROOT / ".venv" / "bin" / "python"),
        "-m",
        "starling_jax.train_rm",
        "configs/rm_mistral7b_nectar.yaml",
        "train.steps=100",
    ]


def test_per_gpu_mode_runs_one_process_per_gpu():
    out = slurm("--dry-run", "--per-gpu", "--gpus-per-node", "4", "--job", "train_sft", "c.yaml")
    assert out.returncode == 0, out.stderr
    sbatch, srun = commands(out.stdout)
    assert "--ntasks-per-node=4" in sbatch and "--gpus-per-node=4" in sbatch and "--per-gpu" in sbatch
    assert "--ntasks-per-node=4" in srun and srun[-3:] == ["-m", "starling_jax.train_sft", "c.yaml"]


def test_xla_gpu_flags_are_all_known_to_this_jaxlib():
    srun = commands(slurm("--dry-run", "c.yaml").stdout)[1]
    flags = next(a for a in srun if a.startswith("XLA_FLAGS="))[len("XLA_FLAGS=") :]
    assert len(flags.split()) >= 5
    # XLA aborts at start-up on an unknown flag (GPU flags are parsed on every platform)
    out = subprocess.run(
        [sys.executable, "-c", "import jax; jax.numpy.ones(2).block_until_ready(); print('ok')"],
        env=clean_env(XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_inside_an_allocation_srun_starts_the_entry_point(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(tmp_path / 'srun.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    (bin_dir / "srun").chmod(0o755)
    env = clean_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="77",
        SLURM_GPUS_ON_NODE="8",
        XLA_FLAGS="--xla_dump_to=/tmp/x",
    )
    out = slurm("--job", "train_rm", "train.steps=3", env=env)
    assert out.returncode == 0, out.stderr
    argv = json.loads((tmp_path / "srun.json").read_text())
    assert argv[:2] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    xla = next(a for a in argv if a.startswith("XLA_FLAGS="))
    assert xla.endswith(" --xla_dump_to=/tmp/x")  # the caller's flags are kept, after the recommended ones
    assert argv[-4].endswith("python") and argv[-3:] == ["-m", "starling_jax.train_rm", "train.steps=3"]
    assert "STARLING_JAX_DISTRIBUTED=slurm" in argv


def test_usage_errors_are_one_line(tmp_path):
    cases = [
        ((), "CONFIG"),
        (("--dry-run", "--colour", "c.yaml"), "--colour"),
        (("--dry-run", "--nodes"), "--nodes"),
        (("--dry-run", "c.yaml", "stray"), "stray"),
        (("missing.yaml",), "missing.yaml"),
    ]
    for args, named in cases:
        out = slurm(*args)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0], (args, out.stderr)
    out = subprocess.run(
        ["/bin/bash", str(SCRIPT), "train.steps=3"],
        env=clean_env(PATH=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "sbatch not found" in lines[0], out.stderr


def test_slurm_distributed_args():
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "gpu[003-010,012],cpu1",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
    }
    args = cli.slurm_distributed_args(env)
    assert args == {
        "coordinator_address": f"gpu003:{61440 + 4242 % 4096}",
        "num_processes": 16,
        "process_id": 9,
        "local_device_ids": [1],
        "cluster_detection_method": "deactivate",
    }
    per_node = cli.slurm_distributed_args(
        {**env, "SLURM_STEP_TASKS_PER_NODE": "1(x16)", "STARLING_JAX_COORDINATOR_PORT": "1234"}
    )
    assert per_node["local_device_ids"] is None and per_node["coordinator_address"] == "gpu003:1234"
    assert cli.first_slurm_host("node7") == "node7" and cli.first_slurm_host("a-1,a-2") == "a-1"
    assert cli.first_slurm_host("dgx-[07,09-11]") == "dgx-07"
    for key in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NODELIST"):
        with pytest.raises(ConfigError, match=key):
            cli.slurm_distributed_args({k: v for k, v in env.items() if k != key})


@pytest.mark.multiprocess
def test_two_processes_with_slurm_environment_join_one_run():
    code = (
        "from starling_jax import cli; cli.initialize_distributed(); import jax, numpy as np; "
        "from jax.experimental import multihost_utils as m; "
        "g = m.process_allgather(np.asarray([jax.process_index()])); "
        "print('RESULT', jax.process_count(), jax.device_count(), g.ravel().tolist(), flush=True)"
    )
    port = free_port()
    procs = []
    for pid in (0, 1):
        env = clean_env(
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            STARLING_JAX_DISTRIBUTED="slurm",
            STARLING_JAX_COORDINATOR_PORT=str(port),
            SLURM_JOB_ID="4242",
            SLURM_STEP_NODELIST="localhost",
            SLURM_NTASKS="2",
            SLURM_PROCID=str(pid),
            SLURM_LOCALID=str(pid),
            SLURM_STEP_TASKS_PER_NODE="2",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = [p.communicate(timeout=180) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-2000:]
        assert [l for l in stdout.splitlines() if l.startswith("RESULT")] == ["RESULT 2 4 [0, 1]"], stdout
