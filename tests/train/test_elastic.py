"""Elastic restore: a checkpoint written by 2 processes × 4 devices (8 devices) continues on 1 process × 4 devices
with the same parameters and the same data position — its losses and final weights equal an uninterrupted
one-device run's. (The data position is global: `(epoch, batch)` of the global batch plan, which does not depend on
the process count; Orbax restores each array into the new mesh's shardings.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from starling_jax.data.synthetic import generate, write_jsonl
from tests.entrypoints import entry_cmd, env_with, free_port, losses, summary

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

FAST = [
    "train.log_every=1",
    "train.eval_every=100",
    "train.save_every=4",
    "train.progress_bar=false",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "data.eval_fraction=0.2",
    "export.plot=false",
    "optim.warmup_steps=2",
    "optim.schedule=constant",
    "train.eval_max_batches=1",
    "model.num_hidden_layers=2",
]  # constant after warm-up: the schedule does not depend on train.steps


def cmd(out: Path, data: Path, *extra: str) -> list[str]:
    return entry_cmd("train_rm", out, data, *FAST, *extra)


def weights(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(hf_dir / "model.safetensors"))


def test_two_processes_eight_devices_restore_on_one_process_four_devices(tmp_path):
    data = write_jsonl(generate(120, seed=3), tmp_path / "small.jsonl")
    # reference: one process, one device, 8 steps uninterrupted
    ref = subprocess.Popen(
        cmd(tmp_path / "ref", data, "train.steps=8"),
        env=env_with(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # first half: 2 processes × 4 devices (mesh fsdp=8 across both), stops after the step-4 checkpoint
    out, port = tmp_path / "elastic", free_port()
    halves = [
        subprocess.Popen(
            cmd(out, data, "train.steps=4", "export.hf=false"),
            env=env_with(
                4,
                STARLING_JAX_COORDINATOR=f"127.0.0.1:{port}",
                STARLING_JAX_NUM_PROCESSES="2",
                STARLING_JAX_PROCESS_ID=str(pid),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    for p in halves:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        assert summary(stdout)["steps"] == 4
    # second half: 1 process × 4 devices resumes from it
    resumed = subprocess.run(
        cmd(out, data, "train.steps=8"), env=env_with(4), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = summary(resumed.stdout)
    assert s["resumed_from"] == 4 and s["steps"] == 8
    stdout, stderr = ref.communicate(timeout=600)
    assert ref.returncode == 0, stderr[-3000:]

    a, b = losses(tmp_path / "ref"), losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    # steps 5..8 ran on the restored parameters and the restored data position
    np.testing.assert_allclose([b[i] for i in range(1, 9)], [a[i] for i in range(1, 9)], rtol=0, atol=1e-5)
    assert np.ptp([a[i] for i in range(5, 9)]) > 1e-3
    wa, wb = weights(tmp_path / "ref" / "hf"), weights(out / "hf")
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_allclose(wb[key], wa[key], rtol=0, atol=1e-5, err_msg=key)
