"""End-to-end reward-model training: sharding equivalence, kill/resume, preemption, export parity, user errors.

Runs `python -m starling_jax.train_rm` in subprocesses (each picks its own simulated device count) on a small
synthetic Nectar-format file.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from starling_jax.data.synthetic import generate, write_jsonl
from tests.entrypoints import entry_cmd, env_with, free_port, kill_after_metrics, losses, run_entry

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
def eight_devices(tmp_path_factory, data_file) -> tuple[Path, dict]:
    """One process, 8 devices on a data × fsdp × tensor = 2 × 2 × 2 mesh: what the one-device run and the
    two-process run are compared with (its output folder, its summary)."""
    out = tmp_path_factory.mktemp("eight_devices")
    return out, run_train(out, data_file, *MESH_2X2X2, devices=8)


def test_one_device_and_eight_devices_give_the_same_losses(tmp_path, data_file, eight_devices):
    single = run_train(tmp_path / "one", data_file, devices=1)
    eight_dir, sharded = eight_devices
    assert single["steps"] == sharded["steps"] == 8
    a, b = losses(tmp_path / "one"), losses(eight_dir)
    assert sorted(a) == list(range(1, 9))
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(a)], rtol=0, atol=1e-5)
    # the losses differ step to step: the comparison is not between two constant curves
    assert np.ptp([a[s] for s in a]) > 1e-2
    assert single["eval_pairwise_accuracy"] == pytest.approx(sharded["eval_pairwise_accuracy"], abs=1e-6)


def test_gradient_accumulation_matches_full_batch(tmp_path, data_file):
    run_train(tmp_path / "full", data_file, "train.steps=3")
    run_train(tmp_path / "micro", data_file, "train.steps=3", "train.micro_batches=4")
    a, b = losses(tmp_path / "full"), losses(tmp_path / "micro")
    np.testing.assert_allclose([a[s] for s in (1, 2, 3)], [b[s] for s in (1, 2, 3)], atol=1e-5)


def test_sigkill_then_restart_resumes_exactly(tmp_path, data_file):
    steps = ["train.steps=16", "train.save_every=4", "train.eval_every=100"]
    run_train(tmp_path / "straight", data_file, *steps)
    reference = losses(tmp_path / "straight")

    out = tmp_path / "killed"
    kill_after_metrics(train_cmd(out, data_file, *steps), out, rows=9, timeout=300)  # past some checkpoint
    killed_at = max(losses(out))
    assert killed_at < 16

    summary = run_train(out, data_file, *steps)
    assert summary["resumed_from"] is not None and summary["resumed_from"] <= killed_at
    assert summary["resumed_from"] % 4 == 0
    resumed = losses(out)
    assert sorted(resumed) == sorted(reference)
    np.testing.assert_allclose(
        [resumed[s] for s in sorted(reference)], [reference[s] for s in sorted(reference)], rtol=0, atol=1e-6
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
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "preempted"
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [summary["steps"]] and 3 <= summary["steps"] < 400


def test_export_loads_in_transformers_and_score_agrees(tmp_path, data_file):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    summary = run_train(out, data_file, "train.steps=4", "export.hf=true")
    hf_dir = Path(summary["hf_export_dir"])
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


def test_tensorboard_and_metrics_jsonl_hold_the_training_scalars(tmp_path, data_file):
    import tensorflow as tf

    out = tmp_path / "run"
    run_train(out, data_file, "train.steps=4", "train.eval_every=2", "train.peak_tflops_per_device=1.0")
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


def test_checkpoint_from_another_model_size_is_a_one_line_error(tmp_path, data_file):
    out = tmp_path / "run"
    run_train(out, data_file, "train.steps=4")
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


@pytest.mark.multiprocess
def test_two_processes_give_the_same_losses_as_one(tmp_path, data_file, eight_devices):
    mesh = MESH_2X2X2
    one_dir, single = eight_devices
    out = tmp_path / "two"
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
                train_cmd(out, data_file, *mesh, "export.hf=true"),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    summaries = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in results]
    a, b = losses(one_dir), losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(a)], rtol=0, atol=1e-5)
    for summary in summaries:  # every host computed the same metrics over the whole eval split
        assert summary["eval_pairwise_accuracy"] == pytest.approx(single["eval_pairwise_accuracy"], abs=1e-6)
    assert (out / "hf" / "model.safetensors").is_file()
