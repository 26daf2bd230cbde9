"""End-to-end `python -m starling_jax.train_sft`: 8 devices = 1 device, SIGKILL/restart resumes exactly, and the HF
export loads in transformers with the same logits, renders the training tokens and stops at the end of turn.

The 8-device run and the restart after the SIGKILL run in this process (`train_sft.main`, on the session's 8
simulated devices; tests/conftest.py): a process start is most of a tiny run's cost. The killed run is a subprocess on
8 devices with the same mesh, so that its programs and losses are this process's."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from starling_jax import train_sft
from starling_jax.data.synthetic import generate, write_jsonl
from tests.entrypoints import entry_cmd, kill_after_metrics, losses, run_entry

pytestmark = pytest.mark.slow

FAST = [
    "train.steps=8",
    "train.log_every=1",
    "train.eval_every=4",
    "train.save_every=4",
    "train.progress_bar=false",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "data.eval_fraction=0.2",
    "export.plot=false",
    "optim.warmup_steps=2",
    "model.hidden_size=32",
    "model.intermediate_size=64",
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(generate(80, seed=4), tmp_path_factory.mktemp("sft_data") / "small.jsonl")


def cmd(out: Path, data: Path, *extra: str) -> list[str]:
    return entry_cmd("train_sft", out, data, *FAST, *extra)


def run(out: Path, data: Path, *extra: str, devices: int = 1) -> dict:
    return run_entry(cmd(out, data, *extra), devices)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_file):
    out = tmp_path_factory.mktemp("sft") / "straight"
    return out, run(out, data_file)


def test_summary_and_eval_loss_goes_down(straight):
    out, s = straight
    for key in ("output_dir", "steps", "eval_loss_start", "eval_loss_end", "hf_export_dir", "status"):
        assert key in s, key
    assert s["status"] == "completed" and s["steps"] == 8 and s["eval_loss_end"] < s["eval_loss_start"]
    assert s["eval_perplexity_end"] == pytest.approx(np.exp(s["eval_loss_end"]), rel=1e-6)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"grad_norm", "grad_norm_clipped", "learning_rate", "tokens_per_s"} <= set(rows[0])
    assert all(r["grad_norm_clipped"] == pytest.approx(min(r["grad_norm"], 1.0)) for r in rows)


EIGHT = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "export.hf=false"]


@pytest.fixture(scope="module")
def eight(tmp_path_factory, data_file):
    """The same run on 8 devices (data × fsdp × tensor = 2 × 2 × 2), in this process."""
    assert jax.device_count() == 8
    out = tmp_path_factory.mktemp("sft") / "eight"
    return out, in_process(cmd(out, data_file, *EIGHT))


def in_process(command: list[str]) -> dict:
    """`python -m starling_jax.train_sft ARGS` run as `train_sft.main(ARGS)` here → its JSON summary."""
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert train_sft.main(command[3:]) == 0
    return json.loads(stdout.getvalue().strip().splitlines()[-1])


def test_eight_devices_give_the_same_losses(straight, eight):
    (out, _), (eight_out, _) = straight, eight
    a, b = losses(out), losses(eight_out)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)], rtol=0, atol=2e-5)
    assert np.ptp(list(a.values())) > 1e-2


def test_sigkill_then_restart_resumes_exactly(tmp_path, data_file, eight):
    # The uninterrupted run: the 8-device one (fixture). Killed once the step-4 checkpoint exists and training went
    # past it (a subprocess on the same 8 devices and mesh), then restarted here: every loss equals the uninterrupted
    # run's, and so do the eval losses (the start one kept in the checkpoint).
    ref_out, ref = eight
    out = tmp_path / "killed"
    kill_after_metrics(cmd(out, data_file, *EIGHT, "train.async_checkpointing=false"), out, rows=5, devices=8)
    summary = in_process(cmd(out, data_file, *EIGHT))
    assert summary["resumed_from"] == 4
    assert summary["eval_loss_start"] == pytest.approx(ref["eval_loss_start"], abs=1e-6)  # kept in the checkpoint
    reference, resumed = losses(ref_out), losses(out)
    np.testing.assert_allclose(
        [resumed[s] for s in range(1, 9)], [reference[s] for s in range(1, 9)], rtol=0, atol=1e-6
    )
    assert summary["eval_loss_end"] == pytest.approx(ref["eval_loss_end"], abs=1e-6)


def test_export_loads_in_transformers_renders_the_training_tokens_and_stops(straight, data_file):
    torch = pytest.importorskip("torch")
    import jax
    from flax import nnx
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from starling_jax.ckpt.manager import load_model
    from starling_jax.data.sft import read_conversations, tokenize_conversation
    from starling_jax.data.tokenizer import default_tokenizer_dir, load_tokenizer
    from starling_jax.parallel import sharding

    out, s = straight
    hf_dir = Path(s["hf_export_dir"])
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"]

    # the chat template renders exactly the training tokens (BOS, prompt, answer, end of turn)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    train_tok = load_tokenizer(default_tokenizer_dir("llama2_chat"))
    convs = list(read_conversations(data_file))[:4]
    batch_tokens = []
    for conv in convs:
        want = tokenize_conversation(conv, train_tok, "llama2_chat", 256).tokens.tolist()
        got = tok.apply_chat_template([*conv.messages, {"role": "assistant", "content": conv.answer}], tokenize=True)
        got = got["input_ids"] if hasattr(got, "keys") else got
        assert list(got) == want
        batch_tokens.append(want)
        # the generation prompt is the training prompt, up to the answer
        prompt = tok.apply_chat_template(list(conv.messages), tokenize=True, add_generation_prompt=True)
        prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
        assert want[: len(prompt)] == list(prompt)

    # generation stops at the template's end-of-turn token (`</s>` for llama2_chat)
    gen = GenerationConfig.from_pretrained(str(hf_dir))
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert eos[0] == batch_tokens[0][-1] == tok.convert_tokens_to_ids("</s>")

    # logits of transformers on the export = starling_jax's on the checkpoint (fp32)
    length = max(map(len, batch_tokens))
    tokens = np.zeros((len(batch_tokens), length), np.int32)
    lengths = np.array([len(t) for t in batch_tokens])
    for i, t in enumerate(batch_tokens):
        tokens[i, : len(t)] = t
    seg = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    _, cfg, graphdef, params = load_model(out, mesh)
    ours = np.asarray(nnx.merge(graphdef, params)(tokens, np.arange(length)[None] * seg, seg))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(seg)).logits.numpy()
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(ours[i, :n], theirs[i, :n], atol=1e-4, rtol=0)
