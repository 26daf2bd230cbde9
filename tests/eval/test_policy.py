"""`evaluate bon` and `evaluate policy` on tiny random models: best-of-n picks the best of the first n samples by
`score`'s rewards, the reward rises with n and the KL column is log n − (n − 1)/n; the `rm:` judge's win rates come
from `score`'s rewards; the `openai:` judge (pairwise and MT-Bench single-answer grading) runs over real HTTP
against the OpenAI-protocol test server of `label`; bad input is a one-line error or a counted, reported skip."""

from __future__ import annotations

import json
import math
import re
import shutil
import time

import numpy as np
import pytest

from starling_jax import evaluate
from starling_jax.eval import bon, mtbench, winrate
from tests.judge.fake_openai import ANSWER, Server
from tests.model.hf_fixtures import make_hf_model, require_torch

SMALL = {"vocab": 32000, "hidden": 32, "layers": 2, "heads": 4, "inter": 64, "sliding_window": None}
SAMPLING = ["--max-new-tokens", "12", "--batch-size", "4", "--temperature", "1.0"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    require_torch()
    from starling_jax.data.tokenizer import default_tokenizer_for

    base = tmp_path_factory.mktemp("models")
    out = {
        "rm": make_hf_model(base / "rm", "mistral", "score", **SMALL),
        "a": make_hf_model(base / "a", "mistral", "lm", seed=1, **SMALL),
        "b": make_hf_model(base / "b", "mistral", "lm", seed=2, **SMALL),
    }
    for folder in out.values():
        for f in default_tokenizer_for("llama2_chat").iterdir():
            shutil.copy(f, folder / f.name)
    return out


def run(capsys, *argv) -> tuple[int, dict, str]:
    code = evaluate.main(list(argv))
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), err


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PROMPTS = [{"prompt": f"Tell me about topic {i}.", "reference": "A reference answer. " * (1 + i % 3)} for i in range(5)]


def test_kl_column_is_the_formula():
    assert bon.analytic_kl(1) == 0.0
    assert bon.analytic_kl(2) == pytest.approx(math.log(2) - 0.5)
    rows = bon.best_of_n_table([[0.0, 1.0, 3.0, 2.0], [5.0, 4.0, 1.0, 0.0]], [1, 2, 4])
    assert [r["kl_analytic"] for r in rows] == [math.log(n) - (n - 1) / n for n in (1, 2, 4)]
    assert [r["mean_reward"] for r in rows] == [2.5, 3.0, 4.0]


def test_bon_takes_the_best_of_the_first_n_by_score_rewards(tmp_path, folders, capsys):
    from starling_jax import score as score_lib

    prompts = write(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "bon"
    code, summary, err = run(
        capsys,
        "bon",
        "--policy",
        str(folders["a"]),
        "--reward-model",
        str(folders["rm"]),
        "--n",
        "1,2,4",
        "--prompts",
        str(prompts),
        "--output-dir",
        str(out),
        "--max-length",
        "128",
        *SAMPLING,
    )
    assert code == 0, err
    table = summary["table"]
    assert [r["n"] for r in table] == [1, 2, 4] and (out / "bon.png").stat().st_size > 0
    assert [r["kl_analytic"] for r in table] == [math.log(n) - (n - 1) / n for n in (1, 2, 4)]
    assert table[0]["mean_reward"] < table[1]["mean_reward"] <= table[2]["mean_reward"]
    # brute force: score every sample with `score`, take the best of the first n per prompt
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    rows = [
        {
            "prompt": f"\n\nHuman: {p['prompt']}\n\nAssistant:",
            "answers": [
                {"answer": s["completion"], "rank": k + 1}
                for k, s in enumerate(x for x in samples if x["row"] == i + 1)
            ],
        }
        for i, p in enumerate(PROMPTS)
    ]
    scored = tmp_path / "scored.jsonl"
    score_lib.score(str(folders["rm"]), str(write(tmp_path / "rows.jsonl", rows)), str(scored), max_length=128)
    rewards = [json.loads(x)["rewards"] for x in scored.read_text().splitlines()]
    assert len({len(r) for r in rewards}) == 1 and len(rewards[0]) == 4
    for row in table:
        assert row["mean_reward"] == pytest.approx(np.mean([max(r[: row["n"]]) for r in rewards]), rel=1e-6)


def test_policy_rm_judge_compares_two_models(tmp_path, folders, capsys):
    from starling_jax import score as score_lib

    prompts = write(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "policy"
    code, summary, err = run(
        capsys,
        "policy",
        "--model",
        str(folders["a"]),
        "--model",
        str(folders["b"]),
        "--prompts",
        str(prompts),
        "--judge",
        f"rm:{folders['rm']}",
        "--output-dir",
        str(out),
        "--max-length",
        "128",
        *SAMPLING,
    )
    assert code == 0, err
    assert "LC win %" in err and str(folders["b"])[-20:] in err  # one comparison table, both models
    assert (out / "policy.png").stat().st_size > 0
    for m, row in enumerate(summary["models"]):
        answers = [json.loads(x)["completion"] for x in (out / f"answers_{m}.jsonl").read_text().splitlines()]
        rows = [
            {
                "prompt": f"\n\nHuman: {p['prompt']}\n\nAssistant:",
                "answers": [{"answer": p["reference"], "rank": 1}, {"answer": a, "rank": 2}],
            }
            for p, a in zip(PROMPTS, answers)
        ]
        scored = tmp_path / f"scored_{m}.jsonl"
        score_lib.score(str(folders["rm"]), str(write(tmp_path / f"rows_{m}.jsonl", rows)), str(scored), max_length=128)
        rewards = [json.loads(x)["rewards"] for x in scored.read_text().splitlines()]
        prefs = [1.0 if r[1] > r[0] else 0.5 if r[1] == r[0] else 0.0 for r in rewards]
        want = winrate.length_controlled_win_rate(
            prefs, [len(a) for a in answers], [len(p["reference"]) for p in PROMPTS]
        )
        assert row["win_rate"] == pytest.approx(want["win_rate"])
        assert row["length_controlled_win_rate"] == pytest.approx(want["length_controlled_win_rate"])
        assert row["mean_reward"] == pytest.approx(np.mean([r[1] for r in rewards]), rel=1e-5)
        assert row["mean_length"] == pytest.approx(np.mean([len(a) for a in answers]))
        assert row["skipped"] == 0 and row["judged"] == len(PROMPTS)


class ScriptedJudge:
    """The test server's judge for `evaluate`: Nectar ranking prompts → the longer answer ranked first (except one
    prompt it never answers usefully); MT-Bench grading prompts → a rating that depends on the turn, except for one
    question whose reply holds no rating."""

    def __init__(self):
        self.requests = []

    def handle(self, body, authorization):
        messages = body["messages"]
        user = next(m["content"] for m in messages if m["role"] == "user")
        self.requests.append(messages)
        shown = ANSWER.findall(user)
        if shown:
            if "topic 3" in user:
                reply = "I cannot decide."
            else:
                order = sorted((letter for letter, _ in shown), key=lambda x: -len(dict(shown)[x]))
                reply = "Pairs compared.\n" + repr([order])
        elif "UNRATEABLE" in user:
            reply = "This answer is fine."
        else:
            turn = 2 if "Assistant A's Conversation" in user else 1
            reply = f"Explanation.\nRating: [[{3 + 4 * (turn - 1)}]]"
        return (
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
            },
            {},
        )


def test_policy_openai_pairwise_and_mtbench(tmp_path, folders, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judge = ScriptedJudge()
    questions = [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Make it shorter."]},
        {"question_id": 111, "category": "math", "turns": ["What is 2+2?", "And 3+3?"], "reference": ["4", "6"]},
        {"question_id": 99, "category": "writing", "turns": ["UNRATEABLE one.", "UNRATEABLE two."]},
    ]
    with Server(judge) as server:
        common = [
            "--judge",
            "openai:fake-judge",
            "--base-url",
            server.base_url,
            "--max-retries",
            "1",
            "--backoff",
            "0.01",
            "--model",
            str(folders["a"]),
            *SAMPLING,
        ]
        code, summary, err = run(
            capsys,
            "policy",
            "--prompts",
            str(write(tmp_path / "p.jsonl", PROMPTS)),
            "--output-dir",
            str(tmp_path / "pairwise"),
            *common,
        )
        assert code == 0, err
        row = summary["models"][0]
        answers = [
            json.loads(x)["completion"] for x in (tmp_path / "pairwise" / "answers_0.jsonl").read_text().splitlines()
        ]
        want = [
            1.0 if len(a) > len(p["reference"]) else 0.0 if len(a) < len(p["reference"]) else 0.5
            for p, a in zip(PROMPTS, answers)
        ]
        kept = [i for i in range(len(PROMPTS)) if i != 3]  # topic 3: the judge never answers: a counted skip
        assert row["skipped"] == 1 and row["judged"] == 4
        assert row["win_rate"] == pytest.approx(100 * np.mean([want[i] for i in kept]))
        lines = [json.loads(x) for x in (tmp_path / "pairwise" / "judgements.jsonl").read_text().splitlines()]
        assert "judge did not answer" in lines[3]["error"] and lines[3]["preference"] is None

        code, summary, err = run(
            capsys,
            "policy",
            "--prompts",
            str(write(tmp_path / "q.jsonl", questions)),
            "--output-dir",
            str(tmp_path / "mt"),
            *common,
        )
        assert code == 0, err
    row = summary["models"][0]
    assert summary["format"] == "mtbench" and row["rated"] == 4 and row["skipped"] == 2
    assert row["mtbench_turn_1"] == 3 and row["mtbench_turn_2"] == 7 and row["mtbench_score"] == 5
    assert row["mtbench_categories"] == {"math": 5.0, "writing": 5.0}
    graded = [m for m in judge.requests if "[[rating]]" in m[0]["content"] + m[-1]["content"]]
    assert len(graded) == 6  # both turns of every question
    math_turn2 = next(m for m in graded if "And 3+3?" in m[-1]["content"] and "Reference answer" in m[-1]["content"])
    assert "### Reference answer:\n6" in math_turn2[-1]["content"]
    turn2 = [json.loads(x) for x in (tmp_path / "mt" / "answers_0_turn2.jsonl").read_text().splitlines()]
    assert len(turn2) == 3 and "Write a poem." in turn2[0]["prompt"] and "Make it shorter." in turn2[0]["prompt"]


def test_mtbench_rating_and_prompts():
    assert mtbench.parse_rating("Rating: [[8.5]]") == 8.5
    assert mtbench.parse_rating("I give it [6] overall") == 6.0
    assert mtbench.parse_rating("no rating here") is None
    q = mtbench.Question(1, 1, "writing", ("Q1", "Q2"), None)
    first, second = mtbench.judge_messages(q, ("A1", "A2"), 1), mtbench.judge_messages(q, ("A1", "A2"), 2)
    assert first[0]["content"] == "You are a helpful assistant." and "[Question]\nQ1" in first[1]["content"]
    assert "### User:\nQ2\n\n### Assistant A:\nA2" in second[1]["content"]
    assert "second user question" in second[0]["content"]


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"question_id": 1, "category": "x", "turns": ["a", "b"]}, {"question_id": 2, "category": "x"}],
            r"q.jsonl: row 2: no 'turns' field",
        ),
        ([{"question_id": 1, "turns": ["only one"]}], r"q.jsonl: row 1: field 'turns': expected two non-empty strings"),
    ],
)
def test_question_file_without_turns_is_a_one_line_error(tmp_path, capsys, rows, message):
    code, summary, err = run(
        capsys,
        "policy",
        "--model",
        "m",
        "--prompts",
        str(write(tmp_path / "q.jsonl", rows)),
        "--judge",
        "openai:x",
        "--base-url",
        "http://127.0.0.1:9/v1",
    )
    assert code == 2 and summary["status"] == "error"
    assert len(err.strip().splitlines()) == 1 and re.search(message, err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["policy", "--prompts", "P", "--judge", "rm:x"], "--model: give at least one policy"),
        (["policy", "--model", "m", "--prompts", "P", "--judge", "bogus"], "expected openai:MODEL or rm:DIR"),
        (["bon", "--n", "0,2", "--policy", "p", "--reward-model", "r"], "every n must be"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, capsys, argv, message):
    argv = [str(write(tmp_path / "p.jsonl", PROMPTS)) if a == "P" else a for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
