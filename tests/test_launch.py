"""The GCP TPU launch script: valid bash, the gcloud commands it would run, and its usage errors."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "tpu_vm.sh"


def run(*args):
    env = dict(os.environ, DRY_RUN="1")
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30)


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_create_picks_the_runtime_for_the_accelerator():
    for accel, version in (("v5p-32", "v2-alpha-tpuv5"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                           ("v6e-16", "v2-alpha-tpuv6e")):
        out = run("create", "rm7b", "us-east5-a", accel, "--spot")
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["gcloud", "compute", "tpus", "tpu-vm", "create", "rm7b", "--zone=us-east5-a",
                                      f"--accelerator-type={accel}", f"--version={version}", "--spot"]


def test_run_starts_the_command_on_every_worker_as_one_distributed_job():
    out = run("run", "rm7b", "z", "--", "python", "-m", "starling_jax.train_rm", "configs/rm_llama2_7b_starling.yaml")
    assert out.returncode == 0, out.stderr
    assert "--worker=all" in out.stdout and "STARLING_JAX_DISTRIBUTED=1" in out.stdout
    assert "starling_jax.train_rm" in out.stdout


def test_usage_errors_exit_2():
    assert run("create", "a", "b", "v9-8").returncode == 2
    assert run("run", "a", "b", "python").returncode == 2
    assert run("bogus").returncode == 2
