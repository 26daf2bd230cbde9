"""End-to-end DPO (`python -m starling_jax.train_dpo`): SIGKILL and restart continue a run exactly, the reference
stays bit-for-bit frozen, a hydra reference equals precomputed reference log-probs, and `score --reference` gives
β·(log-prob difference) as transformers computes it on the exported policy and its reference.

A tiny random policy (an HF folder with the llama2_chat format) on a small synthetic Nectar-format file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from starling_jax.data.synthetic import generate, write_jsonl
from tests.entrypoints import (
    entry_cmd,
    env_with,
    kill_after_metrics,
    losses,
    run_entry,
    summary,
)

pytestmark = pytest.mark.slow

FAST = [
    "train.log_every=1",
    "train.eval_every=100",
    "train.progress_bar=false",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "data.eval_fraction=0.2",
    "data.max_length=128",
    "export.plot=false",
    "optim.learning_rate=1e-2",
    "loss.beta=0.5",
]
SUMMARY_KEYS = {
    "output_dir",
    "steps",
    "eval_pairwise_accuracy_start",
    "eval_pairwise_accuracy_end",
    "eval_kendall_tau_end",
    "eval_logratio_end",
    "hf_export_dir",
    "status",
}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(generate(40, seed=5), tmp_path_factory.mktemp("data") / "small.jsonl")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    """A random tiny causal LM exported as train_sft exports (its tokenizer renders the llama2_chat format)."""
    from flax import nnx

    from starling_jax.data.tokenizer import default_tokenizer_for, load_tokenizer
    from starling_jax.model.heads import build_model
    from starling_jax.train.sft_config import tiny_policy
    from starling_jax.train.sft_job import export_causal_lm

    folder = tmp_path_factory.mktemp("policy") / "hf"
    cfg = tiny_policy().replace(num_hidden_layers=2)
    _, params = nnx.split(build_model(cfg, "causal_lm", seed=3))
    tok_dir = default_tokenizer_for("llama2_chat")
    return export_causal_lm(folder, cfg, params, load_tokenizer(tok_dir), tok_dir, "llama2_chat")


def train_cmd(out: Path, data: Path, policy: Path, *extra: str) -> list[str]:
    return entry_cmd("train_dpo", out, data, f"policy={policy}", *FAST, *extra)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_file, policy_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("straight")
    return out, run_entry(train_cmd(out, data_file, policy_dir, "train.steps=8", "train.save_every=4"))


def test_summary_keys_and_a_frozen_reference(straight, policy_dir):
    from starling_jax.ckpt.manager import load_model
    from starling_jax.model import hf_io
    from starling_jax.parallel import sharding

    out, result = straight
    assert SUMMARY_KEYS <= set(result) and result["status"] == "completed" and result["steps"] == 8
    assert result["eval_pairwise_accuracy_start"] == 0.5  # policy = reference: every implied reward is 0
    assert result["eval_pairwise_accuracy_end"] != 0.5 and result["eval_logratio_end"] != 0.0
    mesh = sharding.make_mesh(sharding.MeshConfig())
    _, _, start = hf_io.load_hf(policy_dir, "causal_lm", mesh)
    meta, _, _, reference = load_model(out / "checkpoints", mesh, name="reference")
    assert meta["models"]["reference"]["trainable"] is False
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(start)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit after 8 updates
    _, _, _, policy = load_model(out / "checkpoints", mesh, name="policy")
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(policy), jax.tree.leaves(start))
    )
    assert json.loads((out / "hf" / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]


def test_sigkill_then_restart_resumes_exactly(tmp_path, data_file, policy_dir, straight):
    reference = losses(straight[0])
    out = tmp_path / "killed"
    cmd = train_cmd(out, data_file, policy_dir, "train.steps=8", "train.save_every=4")
    kill_after_metrics(cmd, out, rows=5, timeout=400, checkpoint=4)
    assert max(losses(out)) < 8
    result = run_entry(cmd)
    assert result["resumed_from"] == 4
    resumed = losses(out)
    assert sorted(resumed) == sorted(reference) == list(range(1, 9))
    np.testing.assert_allclose(
        [resumed[s] for s in range(1, 9)], [reference[s] for s in range(1, 9)], rtol=0, atol=1e-6
    )
    assert result["eval_pairwise_accuracy_end"] == pytest.approx(straight[1]["eval_pairwise_accuracy_end"], abs=1e-9)


def test_eight_sharded_devices_train_as_one(tmp_path, data_file, policy_dir, straight, capsys):
    """The straight run again, in this process on 8 devices (fsdp 4 × tensor 2) with precomputed reference
    log-probs: the shared-prefix rows of every batch (train, eval, the reference pass) split evenly over the 4
    data-parallel devices (13 eval rows once stopped it deep in XLA), and the losses are the one-device run's."""
    from starling_jax import train_dpo

    out = tmp_path / "sharded"
    args = train_cmd(out, data_file, policy_dir, "train.steps=8", "train.save_every=100", "export.hf=false")[3:]
    assert train_dpo.main([*args, "mesh.fsdp=4", "mesh.tensor=2", "reference_logps=precompute"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    a, b = losses(out), losses(straight[0])
    np.testing.assert_allclose([a[s] for s in range(1, 9)], [b[s] for s in range(1, 9)], rtol=1e-4)
    assert result["eval_pairwise_accuracy_end"] == pytest.approx(straight[1]["eval_pairwise_accuracy_end"], abs=1e-6)


def test_hydra_reference_equals_precomputed_reference_logps(tmp_path, data_file, policy_dir):
    """num_layers_unfrozen=1: the hydra copy of the top layer on the policy's frozen bottom gives the same losses
    as the starting policy's log-probs precomputed once (two independent reference paths)."""
    common = [
        "train.steps=3",
        "train.save_every=3",
        "export.hf=false",
        "num_layers_unfrozen=1",
        "data.layout=per_answer",
    ]
    hydra = run_entry(train_cmd(tmp_path / "hydra", data_file, policy_dir, *common))
    pre = run_entry(train_cmd(tmp_path / "pre", data_file, policy_dir, *common, "reference_logps=precompute"))
    a, b = losses(tmp_path / "hydra"), losses(tmp_path / "pre")
    np.testing.assert_allclose([a[s] for s in (1, 2, 3)], [b[s] for s in (1, 2, 3)], rtol=1e-5)
    assert a[3] != a[1]
    assert hydra["eval_pairwise_accuracy_end"] == pytest.approx(pre["eval_pairwise_accuracy_end"], abs=1e-6)
    from starling_jax.ckpt.manager import Checkpointer

    ckpt = Checkpointer(tmp_path / "pre" / "checkpoints", read_only=True)
    assert sorted(ckpt.read_meta()["models"]) == ["policy"]  # no reference weights with precomputed log-probs
    ckpt.close()


def test_score_reference_equals_transformers(tmp_path, straight, policy_dir, data_file):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from starling_jax.data.nectar import read_rankings

    hf_dir = Path(straight[1]["hf_export_dir"])
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(line + "\n" for line in data_file.read_text().splitlines()[:3]))
    beta = 0.3
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "starling_jax.score",
            "--model",
            str(hf_dir),
            "--reference",
            str(policy_dir),
            "--beta",
            str(beta),
            "--data",
            str(rows),
            "--output",
            str(tmp_path / "out.jsonl"),
            "--batch-size",
            "8",
        ],
        env=env_with(1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = summary(proc.stdout)
    assert result["beta"] == beta and result["rows_scored"] == 3
    got = [json.loads(line)["rewards"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    tok = AutoTokenizer.from_pretrained(hf_dir)
    policy = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()

    def logp(model, ids, start):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        return sum(float(lp[t - 1, ids[t]]) for t in range(start, len(ids)))

    for ranking, rewards in zip(read_rankings(str(rows)), got):
        prompt = tok.apply_chat_template(list(ranking.messages), add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        want = []
        for answer in ranking.answers:
            full = tok.apply_chat_template([*ranking.messages, {"role": "assistant", "content": answer}], tokenize=True)
            full = list(full["input_ids"] if hasattr(full, "keys") else full)
            assert full[: len(prompt)] == prompt
            want.append(beta * (logp(policy, full, len(prompt)) - logp(reference, full, len(prompt))))
        np.testing.assert_allclose(rewards, want, rtol=1e-4, atol=1e-4)
        assert np.ptp(want) > 1e-3  # the policy moved: rewards are not all 0
