"""K answers per prompt: `generate --num-samples K` (independent draws, sample 0 = a one-sample run) and
`gather_answers` (generate output, Nectar rows and answer files → unranked Nectar rows that `label` reads)."""

from __future__ import annotations

import json

import pytest

from starling_jax import gather_answers
from starling_jax import generate as gen
from starling_jax.data.nectar import ReadReport
from starling_jax.data.prompts import read_prompts
from starling_jax.judge.rows import read_rows

PROMPTS = [
    {"prompt": "\n\nHuman: Name a fruit.\n\nAssistant:", "source": ["fruit"]},
    {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:"},
    {"messages": [{"role": "user", "content": "Count to three."}]},
]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from flax import nnx

    from starling_jax.data.tokenizer import default_tokenizer_dir
    from starling_jax.model.config import ModelConfig
    from starling_jax.model.heads import build_model
    from starling_jax.model.hf_io import save_hf

    cfg = ModelConfig(
        vocab_size=32000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=None,
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


def test_num_samples_are_independent_draws_and_sample_0_is_the_one_sample_run(policy, tmp_path):
    data = write(tmp_path / "prompts.jsonl", PROMPTS)
    convs = read_prompts(data)
    many = tmp_path / "many.jsonl"
    one = tmp_path / "one.jsonl"
    summary = gen.generate(
        str(policy), convs, max_new_tokens=6, temperature=1.0, seed=3, batch_size=4, output=str(many), num_samples=3
    )
    gen.generate(str(policy), convs, max_new_tokens=6, temperature=1.0, seed=3, batch_size=4, output=str(one))
    lines = [json.loads(x) for x in many.read_text().splitlines()]
    assert summary["rows"] == 9 and summary["num_samples"] == 3
    assert [(x["row"], x["sample"]) for x in lines] == [(r, s) for r in (1, 2, 3) for s in range(3)]
    singles = [json.loads(x) for x in one.read_text().splitlines()]
    assert [x["completion"] for x in lines if x["sample"] == 0] == [x["completion"] for x in singles]
    for r in (1, 2, 3):  # a random 32k-vocabulary model at temperature 1: three draws are not all the same
        assert len({x["completion"] for x in lines if x["row"] == r}) > 1

    # gather: the generated samples + Nectar rows + an answer file → unranked rows label reads
    nectar = write(
        tmp_path / "nectar.jsonl",
        [
            {
                "prompt": PROMPTS[0]["prompt"],
                "answers": [
                    {"answer": "Apple.", "model": "gpt", "rank": 1},
                    {"answer": "Pear.", "model": "llama", "rank": 2},
                ],
                "source": ["nectar"],
            }
        ],
    )
    answers = write(
        tmp_path / "extra.jsonl",
        [
            {"messages": [{"role": "user", "content": "Count to three."}], "completion": "1, 2, 3."},
            {"prompt": PROMPTS[1]["prompt"], "answer": "Blue.", "model": "human"},
        ],
    )
    out = tmp_path / "gathered.jsonl"
    summary = gather_answers.gather(
        str(out), data, generated=[f"{many}=policy"], nectar=[nectar], answers=[answers], max_answers=6
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert summary["rows"] == 3 and summary["rows_too_few"] == 0
    assert summary["answers_per_source"] == {f"{many}=policy": 9, nectar: 2, answers: 2}
    assert rows[0]["prompt"] == PROMPTS[0]["prompt"] and rows[0]["source"] == ["fruit", "nectar"]
    assert [a["model"] for a in rows[0]["answers"]] == ["policy"] * 3 + ["gpt", "llama"]
    assert [a["answer"] for a in rows[0]["answers"]][3:] == ["Apple.", "Pear."]
    assert [a["model"] for a in rows[1]["answers"]] == ["policy"] * 3 + ["human"]
    assert rows[2]["prompt"] == "\n\nHuman: Count to three.\n\nAssistant:"
    assert rows[2]["answers"][-1] == {"answer": "1, 2, 3.", "model": "extra"}
    assert all("rank" not in a for r in rows for a in r["answers"])
    got = list(read_rows(str(out), "error", ReadReport()))  # what label reads
    assert [r.k for r in got] == [5, 4, 4]


def test_gather_limits_dedupe_and_errors(tmp_path, capsys):
    nectar = write(
        tmp_path / "n.jsonl",
        [
            {
                "prompt": "\n\nHuman: a\n\nAssistant:",
                "answers": [{"answer": "x", "model": "m"}, {"answer": "x"}, {"answer": "y"}],
            },
            {"prompt": "\n\nHuman: b\n\nAssistant:", "answers": [{"answer": "z"}]},
        ],
    )
    out = tmp_path / "o.jsonl"
    summary = gather_answers.gather(str(out), nectar=[nectar], dedupe=True)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert summary["rows"] == 1 and summary["rows_too_few"] == 1
    assert [a["answer"] for a in rows[0]["answers"]] == ["x", "y"]
    rc = gather_answers.main(["--output", str(out), "--generated", str(nectar)])
    assert rc == 2 and "--generated needs --prompts" in capsys.readouterr().err
    bad = write(tmp_path / "gen.jsonl", [{"row": 7, "completion": "c"}])
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "\n\nHuman: a\n\nAssistant:"}])
    rc = gather_answers.main(["--output", str(out), "--prompts", prompts, "--generated", bad])
    assert rc == 2 and f"{bad}: row 1: field 'row' is 7" in capsys.readouterr().err
