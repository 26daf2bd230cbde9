"""`label --judge openai:MODEL` against an OpenAI-protocol judge over real HTTP (tests/judge/fake_openai.py, on
127.0.0.1) driven through the real `openai` client: positional-bias mitigation measured against the server's ground
truth, faults (429, 500, timeouts, unparseable replies), kill and restart, and the API key kept out of every file
and log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from starling_jax import label as label_lib
from starling_jax.data.nectar import load_rankings
from starling_jax.judge.aggregate import kendall_tau

from .fake_openai import FakeJudge, Server, key_of

K = 4
SECRET = "sk-test-DO-NOT-LEAK-3f9a0c1e7b"
ROOT = Path(__file__).resolve().parents[2]


def make_rows(n: int, seed: int = 0) -> tuple[list[dict], dict[str, float]]:
    """n unranked rows of K answers; each answer's true quality is known to the fake judge (by its text)."""
    rng = np.random.default_rng(seed)
    rows, qualities = [], {}
    for i in range(n):
        answers = []
        for j in range(K):
            text = f"Answer {j} to question {i}: {rng.integers(1_000_000)}"
            qualities[text] = float(rng.standard_normal())
            answers.append({"answer": text, "model": f"m{j}"})
        rows.append(
            {"prompt": f"\n\nHuman: Question number {i}?\n\nAssistant:", "answers": answers, "source": ["test"]}
        )
    return rows, qualities


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tau_vs_truth(output: Path, qualities) -> float:
    taus = []
    for line in output.read_text().splitlines():
        row = json.loads(line)
        truth = [qualities[a["answer"]] for a in row["answers"]]
        taus.append(kendall_tau([-a["rank"] for a in row["answers"]], truth))
    return float(np.mean(taus))


def test_more_orders_raise_agreement_with_truth_and_remove_positional_bias(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    rows, qualities = make_rows(120)
    data = write_rows(tmp_path / "rows.jsonl", rows)
    judge = FakeJudge(qualities, bias=0.5, noise=0.6)
    results = {}
    with Server(judge) as server:
        for name, kwargs in (
            ("fixed", {"fixed_order": True}),
            ("orders1", {"orders": 1}),
            ("orders2", {"orders": 2}),
            ("orders4", {"orders": 4}),
        ):
            out = tmp_path / f"{name}.jsonl"
            summary = label_lib.label(
                str(data),
                str(out),
                "openai:fake-judge",
                base_url=server.base_url,
                concurrency=4,
                audit=True,
                progress=False,
                **kwargs,
            )
            assert summary["labelled"] == len(rows) and summary["rejected"] == 0
            results[name] = {
                "tau": tau_vs_truth(out, qualities),
                "first": summary["audit"]["label_first_is_shown_first"],
                "judge_first_A": summary["audit"]["by_num_answers"][str(K)]["first_position_rate"][0],
                "agreement": summary["audit"]["agreement"],
                "requests": summary["requests"],
            }
    print("bias benchmark:", json.dumps(results))
    fixed, one, four = results["fixed"], results["orders1"], results["orders4"]
    # the judge's own bias is there under every design: position A is ranked first far more often than 1/K
    for r in results.values():
        assert r["judge_first_A"] > 1 / K + 0.25
    # a fixed order (and one shuffled order) hands the bias to the label; 4 balanced orders remove it
    assert fixed["first"] > 1 / K + 0.25 and one["first"] > 1 / K + 0.25
    assert abs(four["first"] - 1 / K) <= 0.05
    # agreement with the ground truth rises with the orders and beats the fixed order
    assert four["tau"] > one["tau"] + 0.05 and four["tau"] > fixed["tau"] + 0.05
    assert results["orders2"]["tau"] > one["tau"]
    assert four["requests"] == 4 * len(rows) and four["agreement"] is not None and 0 < four["agreement"] < 1


def test_labelled_rows_are_nectar_rows_with_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    rows, qualities = make_rows(6, seed=1)
    data = write_rows(tmp_path / "rows.jsonl", rows)
    with Server(FakeJudge(qualities)) as server:
        out = tmp_path / "out.jsonl"
        summary = label_lib.label(
            str(data), str(out), "openai:fake-judge", base_url=server.base_url, orders=3, progress=False
        )
    assert summary["labelled"] == 6
    labelled = [json.loads(line) for line in out.read_text().splitlines()]
    for raw, got in zip(rows, labelled):
        assert [a["answer"] for a in got["answers"]] == [a["answer"] for a in raw["answers"]]
        assert [a["model"] for a in got["answers"]] == [a["model"] for a in raw["answers"]]
        truth = [qualities[a["answer"]] for a in raw["answers"]]  # noise 0, no bias: the true order exactly
        assert [a["rank"] for a in got["answers"]] == [1 + sum(t > x for t in truth) for x in truth]
        assert got["judge"] == "openai:fake-judge" and got["aggregation"] == "borda" and got["agreement"] == 1.0
        assert len(got["orders"]) == 3 and all(sorted(o) == list(range(K)) for o in got["orders"])
        assert len({o[0] for o in got["orders"]}) == 3  # balanced: no answer shown first twice
        assert got["source"] == ["test"]
    assert len(load_rankings(out)) == 6  # the Nectar reader train_rm / prepare_data use accepts every row


@pytest.mark.slow  # prepare_data imports TensorFlow and builds a TFDS dataset (about a minute here)
def test_prepare_data_accepts_labelled_output(tmp_path, monkeypatch, capsys):
    from starling_jax import prepare_data
    from starling_jax.data.tokenizer import default_tokenizer_dir

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    rows, qualities = make_rows(8, seed=2)
    data = write_rows(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "labelled.jsonl"
    with Server(FakeJudge(qualities, noise=0.3)) as server:
        label_lib.label(str(data), str(out), "openai:fake-judge", base_url=server.base_url, orders=2, progress=False)
    rc = prepare_data.main(
        [
            "--input",
            str(out),
            "--output",
            str(tmp_path / "prepared"),
            "--tokenizer",
            str(default_tokenizer_dir("llama2_chat")),
            "--max-length",
            "64",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["status"] == "completed" and summary["rows_kept"] == 8


def _label_cmd(data, out, base_url, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "starling_jax.label",
        "--input",
        str(data),
        "--output",
        str(out),
        "--judge",
        "openai:fake-judge",
        "--base-url",
        base_url,
        "--orders",
        "2",
        "--timeout",
        "2",
        "--backoff",
        "0.01",
        "--max-attempts",
        "3",
        "--max-retries",
        "4",
        "--no-progress",
        "-v",
        *extra,
    ]


def test_faults_kill_and_restart_lose_nothing_and_send_nothing_twice(tmp_path):
    rows, qualities = make_rows(30, seed=3)
    data = write_rows(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out" / "labelled.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": SECRET, "PYTHONPATH": str(ROOT)}
    proc_holder: dict = {}

    def kill_at(count):  # the 25th request: SIGKILL the label process before it gets an answer
        if count == 25 and "proc" in proc_holder:
            os.kill(proc_holder["proc"].pid, signal.SIGKILL)
            proc_holder["proc"].wait()
            return True
        return False

    faults = {"429": 0.1, "500": 0.1, "timeout": 0.05, "unparseable": 0.15, "never": 0.05}
    judge = FakeJudge(qualities, bias=0.2, noise=0.3, faults=faults, slow_s=3.0, on_request=kill_at)
    logs = []
    with Server(judge) as server:
        # run 1: one request at a time, so every answer before the kill is on disk (strict count below)
        proc = subprocess.Popen(
            _label_cmd(data, out, server.base_url, "--concurrency", "1"),
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proc_holder["proc"] = proc
        stdout, stderr = proc.communicate(timeout=240)
        logs += [stdout, stderr]
        assert proc.returncode == -signal.SIGKILL
        assert not out.exists()  # nothing half-written
        cache = Path(f"{out}.cache.jsonl")
        before = len(cache.read_text().splitlines())
        assert before >= 10
        proc_holder.clear()
        # run 2: restarted with the same arguments (and more concurrency), to the end
        done = subprocess.run(
            _label_cmd(data, out, server.base_url, "--concurrency", "4"),
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
        logs += [done.stdout, done.stderr]
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    labelled = [json.loads(line) for line in out.read_text().splitlines()]
    rejects = [json.loads(line) for line in Path(f"{out}.rejects.jsonl").read_text().splitlines()]

    # nothing lost: every row is labelled or rejected with a reason; rejected rows are exactly those with a key the
    # server never answers usably
    assert summary["rows"] == 30 and summary["labelled"] + summary["rejected"] == 30
    assert len(labelled) == summary["labelled"] and len(rejects) == summary["rejected"] > 0
    never = {key for key in judge.answered() if judge.answered()[key] == 0}
    assert len(never) >= 1
    assert all("unusable reply" in r["reason"] and "3 of 3 attempts" in r["reason"] and r["final"] for r in rejects)
    assert summary["retries"] > 0 and summary["prompt_tokens"] > 0 and summary["completion_tokens"] > 0
    assert summary["cached"] >= 1  # the restart answered orders from the cache
    # nothing sent twice: each order got exactly one usable answer over both runs, and an order whose replies are
    # never usable got exactly --max-attempts replies (the restart did not ask again)
    answered = judge.answered()
    assert all(answered[k] == 1 for k in answered if k not in never)
    assert all(judge.replies(k) == 3 for k in never)
    assert len(answered) == 30 * 2
    # every request the server answered usably is in the cache, once
    cached = [json.loads(line) for line in Path(f"{out}.cache.jsonl").read_text().splitlines() if line.strip()]
    assert sum(r.get("ranking") is not None for r in cached) == sum(answered.values())
    # faults were really injected
    outcomes = [o for v in judge.received.values() for o in v]
    assert outcomes.count("killed") == 1
    for kind in ("429", "500", "timeout", "unparseable"):
        assert kind in outcomes, kind
    # the key reached the server, and nothing we wrote holds it
    assert f"Bearer {SECRET}" in judge.authorization
    for path in out.parent.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path
    assert all(SECRET not in text for text in logs)


def test_missing_key_without_base_url_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    rows, _ = make_rows(2)
    data = write_rows(tmp_path / "rows.jsonl", rows)
    rc = label_lib.main(["--input", str(data), "--output", str(tmp_path / "o.jsonl"), "--judge", "openai:gpt-4"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.err.startswith("error: OPENAI_API_KEY is not set")
    assert json.loads(captured.out.strip().splitlines()[-1])["status"] == "error"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--judge", "gpt-4"], "expected openai:MODEL or rm:DIR"),
        (["--judge", "openai:x", "--orders", "0"], "--orders 0"),
        (["--judge", "openai:x", "--fixed-order", "--orders", "2"], "--fixed-order"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, capsys, argv, message):
    rows, _ = make_rows(2)
    data = write_rows(tmp_path / "rows.jsonl", rows)
    rc = label_lib.main(["--input", str(data), "--output", str(tmp_path / "o.jsonl"), *argv])
    assert rc == 2 and message in capsys.readouterr().err


def test_server_refusal_stops_the_run_without_the_key(tmp_path, monkeypatch, capsys):
    """A 4xx other than 429 (bad model, bad key) cannot be cured by retrying: one line, no key in it."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    rows, qualities = make_rows(2)
    data = write_rows(tmp_path / "rows.jsonl", rows)
    judge = FakeJudge(qualities)
    judge.handle = lambda body, auth: (401, {"error": {"message": "invalid api key", "type": "auth"}}, {})
    with Server(judge) as server:
        rc = label_lib.main(
            [
                "--input",
                str(data),
                "--output",
                str(tmp_path / "o.jsonl"),
                "--judge",
                "openai:fake",
                "--base-url",
                server.base_url,
                "--no-progress",
            ]
        )
    captured = capsys.readouterr()
    assert rc == 2 and "HTTP 401: invalid api key" in captured.err
    assert SECRET not in captured.err + captured.out


def test_key_of_matches_the_first_user_message():
    assert key_of([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) == key_of(
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "again"}]
    )


def test_a_server_that_keeps_failing_rejects_the_row_and_a_rerun_asks_again(tmp_path, monkeypatch):
    """5xx past --max-retries: the row is rejected (not final), nothing is cached, and a rerun sends it again."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    rows, qualities = make_rows(3, seed=4)
    data = write_rows(tmp_path / "rows.jsonl", rows)
    judge = FakeJudge(qualities)
    down = {"on": True}
    real = judge.handle

    def handle(body, auth):
        if down["on"]:
            return 503, {"error": {"message": "overloaded", "type": "server_error"}}, {}
        return real(body, auth)

    judge.handle = handle
    out = tmp_path / "o.jsonl"
    with Server(judge) as server:
        kwargs = dict(base_url=server.base_url, max_retries=2, backoff=0.001, concurrency=2, progress=False)
        summary = label_lib.label(str(data), str(out), "openai:fake", **kwargs)
        assert summary["labelled"] == 0 and summary["rejected"] == 3
        assert summary["requests"] == 3 * 3 and summary["retries"] == 3 * 2
        rejects = [json.loads(line) for line in Path(f"{out}.rejects.jsonl").read_text().splitlines()]
        assert all(
            r["reason"] == "request failed: HTTP 503: overloaded (after 2 retries)" and not r["final"] for r in rejects
        )
        down["on"] = False
        again = label_lib.label(str(data), str(out), "openai:fake", **kwargs)
    assert again["labelled"] == 3 and again["requests"] == 3 and again["retries"] == 0
    assert not Path(f"{out}.rejects.jsonl").read_text()
