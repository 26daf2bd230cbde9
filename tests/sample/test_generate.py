"""`python -m starling_jax.generate`: JSON lines in input order, greedy = transformers' generate on the exported
folder, the embedded default, and one-line errors."""

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from starling_jax import generate as gen  # noqa: E402
from starling_jax.data.chat import render  # noqa: E402
from starling_jax.data.prompts import read_prompts  # noqa: E402

NEW = 5


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny random Mistral causal LM on the real 32k Mistral tokenizer (llama2_chat template), exported to HF."""
    from flax import nnx

    from starling_jax.data.tokenizer import default_tokenizer_dir
    from starling_jax.model.config import ModelConfig
    from starling_jax.model.heads import build_model
    from starling_jax.model.hf_io import save_hf

    cfg = ModelConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=16,
        initializer_range=0.5,
        pad_token_id=0,
    )
    folder = tmp_path_factory.mktemp("policy") / "hf"
    save_hf(
        folder,
        cfg,
        nnx.state(build_model(cfg, "causal_lm", seed=0)),
        "causal_lm",
        tokenizer_dir=default_tokenizer_dir("llama2_chat"),
    )
    return folder


def rows_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_jsonl_in_input_order_and_greedy_equals_transformers(policy, tmp_path, capsys):
    import torch
    import transformers

    from starling_jax.data.tokenizer import load_tokenizer

    convs = [
        {"prompt": "\n\nHuman: Name a color.\n\nAssistant:"},
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Tell me a long story about a horse and a river."},
            ]
        },
        {"prompt": "\n\nHuman: Count to three.\n\nAssistant: one two three\n\nHuman: Again?\n\nAssistant:"},
    ]
    data = rows_file(tmp_path / "in.jsonl", convs)
    out_file = tmp_path / "out" / "answers.jsonl"
    args = [
        "--model",
        str(policy),
        "--data",
        data,
        "--max-new-tokens",
        str(NEW),
        "--temperature",
        "0",
        "--batch-size",
        "2",
        "--output",
        str(out_file),
    ]
    assert gen.main(args) == 0
    summary = last_json(capsys.readouterr().out)
    lines = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert [x["row"] for x in lines] == [1, 2, 3]
    assert summary["status"] == "completed" and summary["rows"] == 3
    assert summary["new_tokens"] == sum(x["num_tokens"] for x in lines) and summary["tokens_per_s"] > 0
    tok = load_tokenizer(policy)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(policy), dtype=torch.float32).eval()
    for line, conv in zip(lines, [read_prompts(data)[i] for i in range(3)]):
        assert set(line) >= {"prompt", "completion", "finish_reason", "num_tokens"}
        assert line["prompt"] == render(tok, conv, "tokenizer")
        assert line["finish_reason"] in ("eos", "stop", "length") and 1 <= line["num_tokens"] <= NEW
        ids = torch.tensor([tok.encode(line["prompt"], add_special_tokens=False)])
        with torch.no_grad():
            ref = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=0,
            )
        ref_ids = ref[0, ids.shape[1] :].tolist()
        if line["finish_reason"] != "stop":  # a stop string ("[INST]") is cut from the text by generate only
            assert line["completion"] == tok.decode(ref_ids, skip_special_tokens=True)
            assert line["num_tokens"] == len(ref_ids)
    # seeded sampling: the same seed gives the same file
    sampled = [
        "--model",
        str(policy),
        "--data",
        data,
        "--max-new-tokens",
        str(NEW),
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--output",
    ]
    assert gen.main(sampled + [str(tmp_path / "a.jsonl")]) == 0
    assert gen.main(sampled + [str(tmp_path / "b.jsonl")]) == 0
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_default_uses_the_sft_run_and_prints_completions(policy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sft_default").mkdir(parents=True)
    (tmp_path / gen.DEFAULT_SFT_HF_DIR).symlink_to(policy)
    assert gen.main(["--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    lines = [json.loads(x) for x in out[-1 - gen.NUM_DEFAULT_PROMPTS : -1]]
    assert [x["row"] for x in lines] == list(range(1, gen.NUM_DEFAULT_PROMPTS + 1))
    assert all("[INST]" in x["prompt"] and x["num_tokens"] <= 3 for x in lines)
    assert json.loads(out[-1])["model"] == gen.DEFAULT_SFT_HF_DIR


@pytest.mark.parametrize("case", ["missing_model", "bad_row", "bad_messages", "unknown_template", "too_long"])
def test_one_line_errors(case, policy, tmp_path, capsys):
    good = {"prompt": "\n\nHuman: hi\n\nAssistant:"}
    args = {
        "missing_model": ["--model", str(tmp_path / "nope"), "--prompt", "hi"],
        "bad_row": ["--model", str(policy), "--data", rows_file(tmp_path / "d.jsonl", [good, {"text": "x"}])],
        "bad_messages": [
            "--model",
            str(policy),
            "--data",
            rows_file(
                tmp_path / "m.jsonl",
                [good, good, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
            ),
        ],
        "unknown_template": ["--model", str(policy), "--prompt", "hi", "--template", "vicuna"],
        "too_long": ["--model", str(policy), "--prompt", "hi " * 400, "--max-new-tokens", "200"],
    }[case]
    expected = {
        "missing_model": "no such model folder",
        "bad_row": "row 2: no 'prompt'",
        "bad_messages": "row 3: field 'messages'",
        "unknown_template": "--template vicuna: choose one of",
        "too_long": "row 1: prompt of 408 tokens leaves no room for --max-new-tokens 200",
    }[case]
    assert gen.main(args) == 2
    captured = capsys.readouterr()
    errors = error_lines(captured.err)
    assert len(errors) == 1 and expected in errors[0], captured.err
    assert "Traceback" not in captured.err
    assert last_json(captured.out)["status"] == "error"
