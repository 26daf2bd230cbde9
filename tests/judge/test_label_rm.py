"""`label --judge rm:DIR` orders answers exactly as `python -m starling_jax.score --model DIR` scores them."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.model.hf_fixtures import make_hf_model, require_torch

require_torch()

from starling_jax import label as label_lib  # noqa: E402
from starling_jax import score as score_lib  # noqa: E402
from starling_jax.data.tokenizer import default_tokenizer_for  # noqa: E402


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    folder = make_hf_model(
        tmp_path_factory.mktemp("rm") / "hf",
        "mistral",
        "score",
        vocab=32000,
        hidden=32,
        layers=2,
        heads=4,
        inter=64,
        sliding_window=None,
    )
    for f in default_tokenizer_for("llama2_chat").iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def rows():
    out = []
    for i in range(7):
        answers = [f"Answer {j} to {i}: " + "word " * (j * 3 + i) for j in range(4)]
        answers.append(answers[1])  # the same text twice: equal rewards, a tie that must stay a tie
        out.append(
            {
                "prompt": f"\n\nHuman: Tell me about thing {i}.\n\nAssistant:",
                "answers": [{"answer": a, "model": f"m{j}", "rank": j + 1} for j, a in enumerate(answers)],
            }
        )
    return out


def test_rm_judge_ranks_exactly_by_score(tmp_path, reward_model):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    scored = tmp_path / "scored.jsonl"
    score_lib.score(str(reward_model), str(data), str(scored), max_length=128)
    out = tmp_path / "labelled.jsonl"
    summary = label_lib.label(str(data), str(out), f"rm:{reward_model}", max_length=128)
    assert summary["labelled"] == 7 and summary["rejected"] == 0 and summary["requests"] == 0
    labelled = [json.loads(line) for line in out.read_text().splitlines()]
    distinct_orders = set()
    for got, want in zip(labelled, (json.loads(line) for line in scored.read_text().splitlines())):
        rewards = want["rewards"]
        assert got["rewards"] == rewards  # the same numbers, to the bit
        ranks = [a["rank"] for a in got["answers"]]
        for i in range(len(rewards)):
            for j in range(len(rewards)):
                # rank order is reward order, ties are ties
                assert (ranks[i] < ranks[j]) == (rewards[i] > rewards[j])
                assert (ranks[i] == ranks[j]) == (rewards[i] == rewards[j])
        assert ranks[1] == ranks[4] and min(ranks) == 1
        assert [a["model"] for a in got["answers"]] == [f"m{j}" for j in range(5)]
        assert got["judge"] == f"rm:{reward_model}"
        distinct_orders.add(tuple(ranks))
    assert len(distinct_orders) > 1  # the model's order is not the input order everywhere


def test_rm_judge_refuses_llm_flags(tmp_path, reward_model, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    rc = label_lib.main(
        ["--input", str(data), "--output", str(tmp_path / "o.jsonl"), "--judge", f"rm:{reward_model}", "--orders", "4"]
    )
    assert rc == 2 and "a reward model takes no" in capsys.readouterr().err
