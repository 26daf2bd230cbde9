"""`evaluate rewardbench`: section and overall scores equal the `rewardbench` package's computation (its own source
when installed, else a transcription: tests/eval/rewardbench_reference.py), length statistics, the reward-model
path through `score`'s rewards, DPO implied rewards against a PyTorch computation, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from starling_jax.eval import rewardbench as rb
from tests.eval import rewardbench_reference as ref


def raw_row(i: int, subset: str, chosen: str, rejected: str) -> dict:
    return {"prompt": f"Question {i} of {subset}?", "chosen": chosen, "rejected": rejected, "subset": subset, "id": i}


class LookupScorer:
    """Rewards from a table (answer text → reward): any PairScorer plugs into `evaluate` the same way."""

    name = "lookup"

    def __init__(self, table, unscored=()):
        self.table, self.unscored = table, set(unscored)

    def score_rows(self, rankings):
        return [
            "does not fit: test" if r.row in self.unscored else np.array([self.table[a] for a in r.answers])
            for r in rankings
        ]


def synthetic(rng, subsets, ties=True):
    """Examples with a random number (1..30) per subset and random correctness; some ties (a tie is wrong)."""
    rows, table, truth = [], {}, []
    i = 0
    for subset in subsets:
        for _ in range(int(rng.integers(1, 31))):
            i += 1
            chosen, rejected = f"chosen {i}", f"rejected {i} " + "x" * int(rng.integers(0, 20))
            outcome = rng.choice(["right", "wrong", "tie"] if ties else ["right", "wrong"])
            table[chosen] = float(rng.normal())
            table[rejected] = table[chosen] + {"right": -1.0, "wrong": 1.0, "tie": 0.0}[outcome] * abs(rng.normal())
            rows.append(raw_row(i, subset, chosen, rejected))
            truth.append((subset, int(outcome == "right")))
    return [rb.validate_example(r, n + 1) for n, r in enumerate(rows)], table, truth


def reference_scores(truth):
    """The package's path: rewardbench.py groups results per subset (num_correct / num_total), then
    calculate_scores_per_section(EXAMPLE_COUNTS, SUBSET_MAPPING, results_grouped); the leaderboard's score is the
    mean of the four sections."""
    counts, mapping, per_section, _ = ref.reference()
    grouped = {}
    for subset in sorted({s for s, _ in truth}):
        results = [c for s, c in truth if s == subset]
        grouped[subset] = sum(results) / len(results)
    sections = per_section(counts, mapping, grouped)
    return grouped, sections, sum(sections.values()) / len(sections)


SCENARIOS = {
    "every subset": lambda subsets: subsets,
    "some subsets missing": lambda subsets: [s for k, s in enumerate(subsets) if k % 3 != 1],
    "a whole section missing (Safety)": lambda subsets: [s for s in subsets if s not in rb.SUBSET_MAPPING["Safety"]],
    "reasoning: math only": lambda subsets: [s for s in subsets if not s.startswith("hep-")],
    "reasoning: code only": lambda subsets: [s for s in subsets if s != "math-prm"],
    "one subset": lambda subsets: ["mt-bench-med"],
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_section_and_overall_scores_equal_the_rewardbench_package(scenario):
    rng = np.random.default_rng(len(scenario))
    examples, table, truth = synthetic(rng, SCENARIOS[scenario](list(rb.SUBSETS)))
    lines, results = rb.evaluate(examples, LookupScorer(table))
    grouped, sections, overall = reference_scores(truth)
    assert [line["correct"] for line in lines] == [bool(c) for _, c in truth]  # ties are wrong, as `chosen > rejected`
    assert results["subsets"] == pytest.approx(grouped, abs=1e-15)
    assert set(results["subsets"]) == set(grouped)
    assert results["sections"] == pytest.approx(sections, abs=1e-12)
    assert results["overall"] == pytest.approx(overall, abs=1e-12)
    assert results["subsets_missing"] == [s for s in rb.SUBSETS if s not in grouped]
    assert results["sections_missing"] == [
        sec for sec, v in sections.items() if not any(s in grouped for s in rb.SUBSET_MAPPING[sec])
    ]


def test_constants_are_the_packages():
    counts, mapping, _, where = ref.reference()
    assert rb.EXAMPLE_COUNTS == counts, where
    assert rb.SUBSET_MAPPING == mapping, where
    # math-prm (447 examples) weighs as much as the six code subsets together
    assert counts["math-prm"] == sum(counts[s] for s in mapping["Reasoning"] if s.startswith("hep-"))
    sections = rb.section_scores(
        {"math-prm": 1.0, **{f"hep-{x}": 0.0 for x in ("cpp", "go", "java", "js", "python", "rust")}}
    )
    assert sections["Reasoning"] == pytest.approx(0.5)


def test_transcription_is_the_package_source():
    folder = ref.package_dir()
    if folder is None:
        pytest.skip("rewardbench not installed (pip install --no-deps rewardbench); the transcription is used")
    counts, mapping, fn = ref.from_package(folder)
    t_counts, t_mapping, t_fn = ref.transcribed()
    assert (counts, mapping) == (t_counts, t_mapping)
    rng = np.random.default_rng(0)
    for _ in range(20):
        metrics = {s: float(rng.random()) for s in counts if rng.random() < 0.7}
        assert fn(counts, mapping, metrics) == t_fn(counts, mapping, metrics)


def test_length_statistics_expose_a_longer_answer_judge():
    """A scorer that prefers the longer answer: right whenever the chosen answer is longer, wrong when shorter,
    and a tie (equal lengths) is wrong; rows a scorer could not score are counted, not averaged."""
    rows = []
    for i, subset in enumerate(
        ["alpacaeval-easy", "alpacaeval-easy", "alpacaeval-easy", "hep-go", "hep-go", "donotanswer"]
    ):
        chosen = "c" * (10 + 5 * (i % 3 == 0))
        rejected = "r" * (12 - 2 * (i % 2))
        rows.append(rb.validate_example(raw_row(i, subset, chosen, rejected), i + 1))

    class Longer(LookupScorer):
        def score_rows(self, rankings):
            return [np.array([float(len(a)) for a in r.answers]) for r in rankings]

    lines, results = rb.evaluate(rows, Longer({}))
    for line in lines:
        diff = line["chosen_chars"] - line["rejected_chars"]
        assert line["correct"] == (diff > 0)
    for subset, stats in results["length"].items():
        if stats["chosen_longer_count"]:
            assert stats["chosen_longer_accuracy"] == 1.0
        if stats["chosen_shorter_count"]:
            assert stats["chosen_shorter_accuracy"] == 0.0
        if stats["same_length_count"]:
            assert stats["same_length_accuracy"] == 0.0
    assert sum(
        s["chosen_longer_count"] + s["chosen_shorter_count"] + s["same_length_count"]
        for s in results["length"].values()
    ) == len(rows)
    _, partial = rb.evaluate(
        rows, LookupScorer({a: float(len(a)) for r in rows for a in r.ranking.answers}, unscored={1, 2})
    )
    assert partial["rows_not_scored"] == 2 and partial["rows_scored"] == len(rows) - 2


def test_unknown_subset_is_a_one_line_error_or_a_counted_skip(tmp_path, capsys):
    from starling_jax import evaluate

    data = tmp_path / "rb.jsonl"
    data.write_text(
        "".join(json.dumps(r) + "\n" for r in [raw_row(1, "hep-go", "a", "b"), raw_row(2, "made-up-subset", "a", "b")])
    )
    assert evaluate.main(["rewardbench", "--model", str(tmp_path / "nowhere"), "--data", str(data)]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [
        (f"error: {data}: row 2: field 'subset': 'made-up-subset' is not a RewardBench v1 subset")
    ]
    assert json.loads(out.strip().splitlines()[-1])["status"] == "error"
    report = rb.ReadReport()
    kept = list(rb.read_examples(str(data), "skip", report))
    assert [e.row for e in kept] == [1] and report.rows_skipped == 1 and "made-up-subset" in report.skipped[0]["reason"]


# ---------------------------------------------------------------------------------------------- with models
@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    from tests.model.hf_fixtures import make_hf_model, require_torch

    require_torch()
    from starling_jax.data.tokenizer import default_tokenizer_for

    base = tmp_path_factory.mktemp("models")
    small = {"vocab": 32000, "hidden": 32, "layers": 2, "heads": 4, "inter": 64, "sliding_window": None}
    folders = {
        "rm": make_hf_model(base / "rm", "mistral", "score", **small),
        "policy": make_hf_model(base / "policy", "mistral", "lm", seed=1, **small),
        "reference": make_hf_model(base / "reference", "mistral", "lm", seed=2, **small),
    }
    for folder in folders.values():
        for f in default_tokenizer_for("llama2_chat").iterdir():
            shutil.copy(f, folder / f.name)
    return folders


def small_file(tmp_path):
    rows = [
        raw_row(i, s, f"A good answer {i}. " * (1 + i % 3), f"Bad {i}. " * (1 + (i + 1) % 4))
        for i, s in enumerate(
            [
                "alpacaeval-easy",
                "alpacaeval-hard",
                "mt-bench-hard",
                "donotanswer",
                "hep-go",
                "math-prm",
                "math-prm",
                "xstest-should-respond",
            ]
        )
    ]
    rows.insert(3, raw_row(99, "not-a-subset", "a", "b"))
    path = tmp_path / "rb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reward_model_entry_point_scores_as_score_does(tmp_path, tiny_folders, capsys):
    from starling_jax import evaluate
    from starling_jax import score as score_lib

    data = small_file(tmp_path)
    out_dir = tmp_path / "out"
    code = evaluate.main(
        [
            "rewardbench",
            "--model",
            str(tiny_folders["rm"]),
            "--data",
            str(data),
            "--output-dir",
            str(out_dir),
            "--max-length",
            "128",
            "--on-bad-row",
            "skip",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["rows_read"] == 9 and summary["rows_skipped"] == 1
    assert summary["rows_scored"] == 8 and "Overall" in err and (out_dir / "rewardbench.png").stat().st_size > 0
    lines = [json.loads(x) for x in (out_dir / "examples.jsonl").read_text().splitlines()]
    # the same rewards as `python -m starling_jax.score` on the same pairs
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps(json.loads(x)) + "\n"
            for x in data.read_text().splitlines()
            if json.loads(x)["subset"] != "not-a-subset"
        )
    )
    scored = tmp_path / "scored.jsonl"
    score_lib.score(str(tiny_folders["rm"]), str(pairs), str(scored), max_length=128)
    want = [json.loads(x)["rewards"] for x in scored.read_text().splitlines()]
    assert [[line["score_chosen"], line["score_rejected"]] for line in lines] == want
    truth = [(line["subset"], int(line["score_chosen"] > line["score_rejected"])) for line in lines]
    _, sections, overall = reference_scores(truth)
    assert summary["sections"] == pytest.approx(sections) and summary["overall"] == pytest.approx(overall)


def test_dpo_implied_rewards_equal_a_pytorch_computation(tmp_path, tiny_folders, capsys):
    import torch
    import transformers

    from starling_jax import evaluate
    from starling_jax.data.tokenize import tokenize_ranking

    beta = 0.25
    scorer = rb.DPOScorer(
        str(tiny_folders["policy"]), str(tiny_folders["reference"]), beta=beta, max_length=128, batch_size=4
    )
    examples = [e for e in rb.read_examples(str(small_file(tmp_path)), "skip")]
    got = scorer.score_rows([e.ranking for e in examples])
    models = {
        k: transformers.AutoModelForCausalLM.from_pretrained(tiny_folders[k], dtype=torch.float32).eval()
        for k in ("policy", "reference")
    }

    def answer_logprob(model, tokens, start):
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
        return float(logp[start - 1 :].sum())

    for e, rewards in zip(examples, got):
        tr = tokenize_ranking(e.ranking, scorer.tokenizer, "tokenizer", 128)
        want = [
            beta * (answer_logprob(models["policy"], list(t), s) - answer_logprob(models["reference"], list(t), s))
            for t, s in zip(tr.tokens, tr.answer_start)
        ]
        np.testing.assert_allclose(rewards, want, rtol=2e-4, atol=2e-4)
    assert len({round(float(r[0]), 3) for r in got}) > 1  # not a constant
    out_dir = tmp_path / "dpo"
    code = evaluate.main(
        [
            "rewardbench",
            "--model",
            str(tiny_folders["policy"]),
            "--reference",
            str(tiny_folders["reference"]),
            "--beta",
            str(beta),
            "--data",
            str(small_file(tmp_path)),
            "--output-dir",
            str(out_dir),
            "--max-length",
            "128",
            "--on-bad-row",
            "skip",
            "--no-plot",
            "--batch-size",
            "4",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["scorer"] == "dpo" and summary["rows_scored"] == 8
    lines = [json.loads(x) for x in (out_dir / "examples.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(
        [[x["score_chosen"], x["score_rejected"]] for x in lines], [list(r) for r in got], rtol=1e-5, atol=1e-5
    )
