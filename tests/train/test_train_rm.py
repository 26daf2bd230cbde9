"""End-to-end reward-model training: sharding equivalence, gradient accumulation, kill/resume, preemption, elastic
restore on another mesh, export parity, user errors.

Runs `python -m starling_jax.train_rm` in subprocesses (each picks its own simulated device count) on a small
synthetic Nectar-format file. The uninterrupted runs are module fixtures that several tests read (each run start
costs ~25 s of CPU here, most of it start-up, so the suite starts as few as the proofs need): `one_device` is the
reference of the eight-device, two-process, gradient-accumulation, SIGKILL and elastic tests; `short_run` (4 steps,
HF export) is read by the export, TensorBoard and other-model-size tests.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from starling_jax.data.synthetic import generate, write_jsonl
from tests.entrypoints import entry_cmd, env_with, free_port, kill_after_metrics, losses, run_entry, summary

pytestmark = pytest.mark.slow

FAST = [
    "train.steps=8",
    "train.log_every=1",
    "train.eval_every=8",
    "train.save_every=4",
    "train.progress_bar=false",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "data.eval_fraction=0.2",
    "export.hf=false",
    "export.plot=false",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(generate(120, seed=3), tmp_path_factory.mktemp("data") / "small.jsonl")


def train_cmd(out: Path, data: Path, *extra: str) -> list[str]:
    return entry_cmd("train_rm", out, data, *FAST, *extra)


def run_train(out: Path, data: Path, *extra: str, devices: int = 1, timeout: int = 600) -> dict:
    return run_entry(train_cmd(out, data, *extra), devices, timeout)


MESH_2X2X2 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, data_file) -> tuple[Path, dict]:
    """The reference: one process, one device, 8 steps uninterrupted (checkpoints at steps 4 and 8)."""
    out = tmp_path_factory.mktemp("one_device")
    return out, run_train(out, data_file, devices=1)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory, data_file) -> tuple[Path, dict]:
    """One process, 8 devices on a data × fsdp × tensor = 2 × 2 × 2 mesh: what the two-process run is compared
    with (its output folder, its summary)."""
    out = tmp_path_factory.mktemp("eight_devices")
    return out, run_train(out, data_file, *MESH_2X2X2, devices=8)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, data_file) -> tuple[Path, dict]:
    """4 steps with an eval every 2 steps, MFU logged and the HF export: read by the export, TensorBoard and
    other-model-size tests (none of them writes into it)."""
    out = tmp_path_factory.mktemp("short_run")
    return out, run_train(
        out, data_file, "train.steps=4", "train.eval_every=2", "train.peak_tflops_per_device=1.0", "export.hf=true"
    )


def test_one_device_and_eight_devices_give_the_same_losses(one_device, eight_devices):
    (one_dir, single), (eight_dir, sharded) = one_device, eight_devices
    assert single["steps"] == sharded["steps"] == 8
    a, b = losses(one_dir), losses(eight_dir)
    assert sorted(a) == list(range(1, 9))
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(a)], rtol=0, atol=1e-5)
    # the losses differ step to step: the comparison is not between two constant curves
    assert np.ptp([a[s] for s in a]) > 1e-2
    assert single["eval_pairwise_accuracy"] == pytest.approx(sharded["eval_pairwise_accuracy"], abs=1e-6)


def test_gradient_accumulation_matches_full_batch(tmp_path, data_file, one_device):
    """4 micro-batches per step give the full batch's losses at every step of the reference run."""
    run_train(tmp_path / "micro", data_file, "train.micro_batches=4")
    a, b = losses(one_device[0]), losses(tmp_path / "micro")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)], rtol=0, atol=1e-5)


def test_sigkill_then_restart_resumes_exactly(tmp_path, data_file, one_device):
    reference_dir, reference_summary = one_device
    reference = losses(reference_dir)
    out = tmp_path / "killed"
    # killed past the step-4 checkpoint, before the end (the same command as the reference run)
    kill_after_metrics(train_cmd(out, data_file), out, rows=5, timeout=300, checkpoint=4)
    killed_at = max(losses(out))
    assert killed_at < 8

    resumed_summary = run_train(out, data_file)
    assert resumed_summary["resumed_from"] == 4
    resumed = losses(out)
    assert sorted(resumed) == sorted(reference) == list(range(1, 9))
    np.testing.assert_allclose(
        [resumed[s] for s in range(1, 9)], [reference[s] for s in range(1, 9)], rtol=0, atol=1e-6
    )
    assert resumed_summary["eval_pairwise_accuracy"] == pytest.approx(
        reference_summary["eval_pairwise_accuracy"], abs=1e-9
    )


def test_sigterm_saves_and_exits_cleanly(tmp_path, data_file):
    out = tmp_path / "term"
    proc = subprocess.Popen(
        train_cmd(out, data_file, "train.steps=400", "train.save_every=1000", "train.eval_every=1000"),
        env=env_with(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (
        (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    stopped = summary(stdout)
    assert stopped["status"] == "preempted"
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [stopped["steps"]] and 3 <= stopped["steps"] < 400


def test_export_loads_in_transformers_and_score_agrees(tmp_path, data_file, short_run):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification

    out, run_summary = short_run
    hf_dir = Path(run_summary["hf_export_dir"])
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["MistralForSequenceClassification"]
    assert config["num_labels"] == 1 and config["pad_token_id"] is not None
    assert config["reward_std"] > 0

    # score on the Orbax checkpoint and on the HF folder
    sample = tmp_path / "sample.jsonl"
    sample.write_text("".join(data_file.read_text().splitlines(keepends=True)[:12]))
    outs = {}
    for name, model in (("ckpt", out), ("hf", hf_dir)):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "starling_jax.score",
                "--model",
                str(model),
                "--data",
                str(sample),
                "--output",
                str(tmp_path / f"{name}.jsonl"),
            ],
            env=env_with(1),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[name] = [json.loads(l) for l in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert [r["row"] for r in outs["ckpt"]] == list(range(1, 13))
    for a, b in zip(outs["ckpt"], outs["hf"]):
        np.testing.assert_allclose(a["rewards"], b["rewards"], atol=1e-5)

    # the same answers as a pairwise (RewardBench-layout) file: best vs worst answer of each row
    rows = [json.loads(l) for l in sample.read_text().splitlines()]
    pairs, expected = [], []
    for row, scored in zip(rows, outs["hf"]):
        ranks = [a["rank"] for a in row["answers"]]
        best, worst = int(np.argmin(ranks)), int(np.argmax(ranks))
        pairs.append(
            {
                "prompt": row["prompt"],
                "chosen": row["answers"][best]["answer"],
                "rejected": row["answers"][worst]["answer"],
            }
        )
        expected.append(scored["rewards"][best] > scored["rewards"][worst])
    pairwise = tmp_path / "pairs.jsonl"
    pairwise.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "starling_jax.score",
            "--model",
            str(hf_dir),
            "--data",
            str(pairwise),
            "--output",
            str(tmp_path / "pairs_scored.jsonl"),
        ],
        env=env_with(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["accuracy"] == pytest.approx(np.mean(expected))

    # transformers (PyTorch) on the same token ids: the reward of its pooled last real token
    from starling_jax.data.nectar import load_rankings
    from starling_jax.data.tokenize import tokenize_ranking
    from starling_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(hf_dir)
    hf_model = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    for ranking, ours in zip(load_rankings(sample)[:4], outs["hf"]):
        tokenized = tokenize_ranking(ranking, tokenizer, "tokenizer", 256)
        for tokens, reward in zip(tokenized.tokens, ours["rewards"]):
            with torch.no_grad():
                logits = hf_model(torch.tensor(np.asarray(tokens)[None], dtype=torch.long)).logits
            assert abs(float(logits[0, 0]) - reward) < 1e-4


def test_tensorboard_and_metrics_jsonl_hold_the_training_scalars(short_run):
    import tensorflow as tf

    out = short_run[0]
    tags = set()
    for events in (out / "tensorboard").glob("events.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            tags |= {v.tag for v in event.summary.value if np.isfinite(v.simple_value)}
    for tag in (
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/mfu",
        "eval/pairwise_accuracy",
        "eval/top1_accuracy",
        "eval/kendall_tau",
        "eval/mean_reward_by_rank/1",
    ):
        assert tag in tags, sorted(tags)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(0 < r["mfu"] < 1 for r in rows)


def _main_error(capsys, argv) -> str:
    from starling_jax.train_rm import main

    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    errors = [l for l in captured.err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["status"] == "error"
    return errors[0]


def test_config_typo_is_a_one_line_error(capsys):
    line = _main_error(capsys, ["optim.learnig_rate=1e-4"])
    assert "learnig_rate" in line and "learning_rate" in line  # names the key and suggests the right one


def test_bad_config_value_is_a_one_line_error(capsys, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("loss:\n  name: listwise\n")
    line = _main_error(capsys, [str(cfg)])
    assert "loss.name" in line and "kwise" in line


def test_missing_data_file_is_a_one_line_error(capsys, tmp_path):
    line = _main_error(capsys, [f"data.train={tmp_path}/nope.jsonl", f"output_dir={tmp_path}/o"])
    assert "nope.jsonl" in line


def test_checkpoint_from_another_model_size_is_a_one_line_error(tmp_path, data_file, short_run):
    out = tmp_path / "run"
    shutil.copytree(short_run[0], out)  # the shared run stays as it is
    # without config.yaml (a run copied without it) the changed config is not refused up front
    # (tests/test_user_errors.py), so this is the checkpoint's own check of the model it holds
    (out / "config.yaml").unlink()
    proc = subprocess.run(
        train_cmd(out, data_file, "train.steps=8", "model.hidden_size=96"),
        env=env_with(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "hidden_size" in errors[0] and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, data_file) -> tuple[Path, list[dict]]:
    """2 processes × 4 devices on the 2 × 2 × 2 mesh, 8 steps with the HF export (its folder, both summaries)."""
    out = tmp_path_factory.mktemp("two_processes")
    port = free_port()
    procs = []
    for pid in (0, 1):
        env = env_with(4)
        env.update(
            STARLING_JAX_COORDINATOR=f"127.0.0.1:{port}",
            STARLING_JAX_NUM_PROCESSES="2",
            STARLING_JAX_PROCESS_ID=str(pid),
        )
        procs.append(
            subprocess.Popen(
                train_cmd(out, data_file, *MESH_2X2X2, "export.hf=true"),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    return out, [summary(stdout) for stdout, _ in results]


@pytest.mark.multiprocess
def test_two_processes_give_the_same_losses_as_one(eight_devices, two_processes):
    one_dir, single = eight_devices
    out, summaries = two_processes
    a, b = losses(one_dir), losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(a)], rtol=0, atol=1e-5)
    for run_summary in summaries:  # every host computed the same metrics over the whole eval split
        assert run_summary["eval_pairwise_accuracy"] == pytest.approx(single["eval_pairwise_accuracy"], abs=1e-6)
    assert (out / "hf" / "model.safetensors").is_file()


@pytest.mark.multiprocess
def test_two_process_checkpoint_restores_on_one_process_four_devices(tmp_path, data_file, one_device, two_processes):
    """Elastic restore: the step-4 checkpoint written by 2 processes × 4 devices (data × fsdp × tensor = 2 × 2 × 2)
    continues on 1 process × 4 devices (the default mesh) with the same parameters and the same data position: its
    losses equal the one-device run's and its final weights the uninterrupted two-process run's. (The data position
    is global: `(epoch, batch)` of the global batch plan, which does not depend on the process count; Orbax restores
    each array into the new mesh's shardings.)"""
    from safetensors.numpy import load_file

    two_dir = two_processes[0]
    out = tmp_path / "elastic"
    shutil.copytree(two_dir, out)
    # the run as it stood after its step-4 checkpoint: later checkpoint, export and metric rows gone
    shutil.rmtree(out / "checkpoints" / "8")
    shutil.rmtree(out / "hf")
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(l + "\n" for l in rows if json.loads(l)["step"] <= 4))

    resumed = run_entry(train_cmd(out, data_file, "export.hf=true"), devices=4)
    assert resumed["resumed_from"] == 4 and resumed["steps"] == 8
    a, b = losses(one_device[0]), losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    # steps 5..8 ran on the restored parameters and the restored data position
    np.testing.assert_allclose([b[i] for i in range(1, 9)], [a[i] for i in range(1, 9)], rtol=0, atol=1e-5)
    assert np.ptp([a[i] for i in range(5, 9)]) > 1e-3
    wa, wb = load_file(str(two_dir / "hf" / "model.safetensors")), load_file(str(out / "hf" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_allclose(wb[key], wa[key], rtol=0, atol=1e-5, err_msg=key)
