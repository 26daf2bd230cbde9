"""`python -m starling_jax.onpolicy`: on-policy rounds on the embedded default policy and reward model (the session's
`default_runs`, tests/conftest.py; or STARLING_DEFAULT_RUNS_DIR's), tiny settings.

One round, then the same chain with `rounds=2` (a restart: round 1 is reused, round 2 starts from round 1's DPO
export and continues its reward model), then a restart after a deleted stage summary (only that stage runs again).
Checked against what nobody in the chain computed: round 2's samples are what `generate` draws from round 1's
policy; `score` (the reward model's own rewards) orders every labelled row exactly as its ranks; `prepare_data`
takes the labelled rows as written.
`slow`: two tiny DPO and train_rm runs (4 steps; their compilation is most of the time), samplers and scorers in 7
processes: about 6 min on 2 cores shared with other jobs (load 12), on top of the shared default runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.entrypoints import run_module_in, summary

K = 3


@pytest.fixture(scope="module")
def defaults(request) -> Path:
    if os.environ.get("STARLING_DEFAULT_RUNS_DIR"):
        cwd = Path(os.environ["STARLING_DEFAULT_RUNS_DIR"])
    else:
        cwd = request.getfixturevalue("default_runs")
    assert all((cwd / r / "config.json").is_file() for r in ("runs/sft_default/hf", "runs/rm_default/hf")), cwd
    return cwd


def run_module(cwd: Path, module: str, *args: str, ok: bool = True) -> tuple[int, dict, str]:
    done = run_module_in(cwd, module, *args, timeout=1200)
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done.returncode, summary(done.stdout), done.stderr


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


TINY = [
    "prompts.per_round=16",
    "prompts.eval_prompts=4",
    f"sampling.num_samples={K}",
    "sampling.max_new_tokens=8",
    "sampling.batch_size=32",
    f"dpo.data.num_answers={K}",
    "dpo.data.batch_size=4",
    "dpo.data.eval_batch_size=8",
    "dpo.train.steps=4",
    "dpo.train.eval_every=4",
    "dpo.train.save_every=4",
    "dpo.export.plot=false",
    "update=[dpo,rm]",  # and a continued train_rm
    f"rm.data.num_answers={K}",
    "rm.data.batch_size=4",
    "rm.train.steps=4",
    "rm.train.eval_every=4",
    "rm.train.save_every=4",
    "rm.export.plot=false",
]


@pytest.mark.slow  # about 6 min on 2 busy cores (module docstring)
def test_two_rounds_chain_label_by_the_reward_model_train_dpo_and_restart(defaults, tmp_path):
    out = tmp_path / "onpolicy"
    base = [f"output_dir={out}", *TINY]

    # --- round 1 alone, then the chain grown to two rounds: round 1 is reused, round 2 runs
    _, one, _ = run_module(defaults, "onpolicy", "rounds=1", *base)
    assert one["status"] == "completed" and len(one["rounds"]) == 1
    _, s, _ = run_module(defaults, "onpolicy", "rounds=2", *base)
    assert s["status"] == "completed"
    assert set(s) >= {
        "output_dir",
        "rounds",
        "start_heldout_reward",
        "final_policy",
        "reward_model",
        "stages_run",
        "stages_reused",
    }
    stages = ("samples", "unranked", "labelled", "dpo", "rm", "eval")
    assert s["stages_run"] == [f"round_2/{stage}" for stage in stages]
    assert s["stages_reused"] == 1 + len(stages)  # round_0/eval and round 1's stages
    r1, r2 = s["rounds"]
    assert r1 == one["rounds"][0]
    for r in (r1, r2):
        assert set(r) >= {
            "round",
            "policy",
            "judge",
            "rows_labelled",
            "rows_rejected",
            "dpo_pairwise_accuracy_start",
            "dpo_pairwise_accuracy_end",
            "heldout_reward",
            "policy_out",
            "dir",
            "dpo_dir",
            "rm_pairwise_accuracy",
            "reward_model_out",
        }
        assert r["judge"] == "rm:runs/rm_default/hf" and 0 < r["rows_labelled"] <= 16
        assert isinstance(r["heldout_reward"], float) and 0 <= r["dpo_pairwise_accuracy_end"] <= 1
    # round 2 starts from round 1's policy: its DPO run's policy and reference, and its samples
    assert r1["policy"] == "runs/sft_default/hf" and r1["policy_out"] == str(out / "round_1" / "dpo" / "hf")
    assert r2["policy"] == r1["policy_out"] and s["final_policy"] == r2["policy_out"]
    assert f"policy: {r1['policy_out']}" in (out / "round_2" / "dpo" / "config.yaml").read_text()
    # ... and its train_rm continues round 1's reward model (round 1's: the default one)
    assert "init_from: runs/rm_default/hf" in (out / "round_1" / "rm" / "config.yaml").read_text()
    assert f"init_from: {r1['reward_model_out']}" in (out / "round_2" / "rm" / "config.yaml").read_text()
    assert s["final_reward_model"] == r2["reward_model_out"] == str(out / "round_2" / "rm" / "hf")
    regen = tmp_path / "regen.jsonl"
    common = ["--data", str(out / "round_2" / "prompts.jsonl"), "--num-samples", str(K), "--max-new-tokens", "8"]
    common += ["--temperature", "1.0", "--batch-size", "32", "--seed", "2"]  # round N samples with seed + N
    run_module(defaults, "generate", "--model", r1["policy_out"], *common, "--output", str(regen))
    completions = lambda path: [(x["row"], x["sample"], x["completion"]) for x in read_jsonl(path)]
    assert completions(regen) == completions(out / "round_2" / "samples.jsonl")
    weights = lambda folder: (Path(folder) / "model.safetensors").read_bytes()
    assert weights(r1["policy_out"]) != weights(defaults / r1["policy"])  # round 1 trained: a policy of its own

    # --- the labels: the reward model's own rewards (`score`) order every row exactly as its ranks, ties equal
    labelled = out / "round_2" / "labelled.jsonl"
    rows = read_jsonl(labelled)
    assert len(rows) == r2["rows_labelled"]
    _, scored, _ = run_module(
        defaults, "score", "--model", "runs/rm_default/hf", "--data", str(labelled), "--output", str(tmp_path / "s")
    )
    score_rows = read_jsonl(tmp_path / "s")
    assert len(score_rows) == len(rows)
    for row, sc in zip(rows, score_rows):
        rewards = sc["rewards"]
        ranks = [a["rank"] for a in row["answers"]]
        assert sorted(set(ranks)) == list(range(1, len(set(ranks)) + 1))
        for i in range(len(ranks)):
            for j in range(len(ranks)):
                assert (ranks[i] < ranks[j]) == (rewards[i] > rewards[j]), (row, rewards)
        assert all(a["model"] == r1["policy_out"] for a in row["answers"])  # round 2's answers: round 1's policy
    # ... and `prepare_data` takes the rows as written
    _, prepared, _ = run_module(
        defaults, "prepare_data", "--input", str(labelled), "--output", str(tmp_path / "prepared")
    )
    assert prepared["rows_read"] == prepared["rows_kept"] == len(rows) and prepared["rows_skipped"] == 0, prepared

    # --- a restart after a stage's summary is gone runs that stage (and any after it) only
    (out / "round_2" / "eval.summary.json").unlink()
    _, again, _ = run_module(defaults, "onpolicy", "rounds=2", *base)
    assert again["stages_run"] == ["round_2/eval"] and again["stages_reused"] == 1 + 2 * len(stages) - 1
    assert again["rounds"][1]["heldout_reward"] == r2["heldout_reward"]  # the same seed, policy and prompts
    # a restart with another config is refused in one line, naming the key
    rc, err, stderr = run_module(defaults, "onpolicy", "rounds=2", *base, "sampling.num_samples=2", ok=False)
    assert rc == 2 and err["error_type"] == "ConfigError" and "sampling.num_samples" in err["error"]


# ------------------------------------------------------------------------------------------------ fast: no model
def test_prompt_split_holds_out_distinct_prompts_no_round_samples():
    """Each distinct prompt once (the bundled file repeats prompts, and answers are joined by prompt text); the
    held-out prompts are in no round; rounds take disjoint prompts while the file lasts, then wrap around."""
    from starling_jax.config import load_config
    from starling_jax.rounds.chain import split_prompts
    from starling_jax.rounds.config import OnPolicyConfig

    cfg = load_config(OnPolicyConfig, None, ["rounds=3", "prompts.per_round=300", "prompts.eval_prompts=16"])
    conversations, held_out, rounds = split_prompts(cfg)
    texts = [json.dumps(c, sort_keys=True) for c in conversations]
    assert len(set(texts)) == len(texts) < 3000  # the bundled file's 3000 rows repeat prompts
    assert len(held_out) == 16 and [len(r) for r in rounds] == [300, 300, 300]
    assert not set(held_out) & set().union(*map(set, rounds))
    assert not set(rounds[0]) & set(rounds[1])  # disjoint while they last; the third wraps around
    assert len(set(rounds[0]) | set(rounds[1]) | set(rounds[2])) == len(texts) - 16


def test_stages_reuse_done_stages_until_the_first_that_is_not(tmp_path):
    from starling_jax.rounds.chain import Stages

    calls = []

    def stage(name):
        def fn():
            calls.append(name)
            (tmp_path / name).write_text("out")
            return {"status": "completed", "name": name}

        return fn

    def run():
        stages = Stages()
        for name in ("a", "b", "c"):
            stages(name, tmp_path / name, tmp_path / f"{name}.summary.json", stage(name))
        return stages

    run()
    assert calls == ["a", "b", "c"]
    calls.clear()
    stages = run()
    assert calls == [] and stages.reused == ["a", "b", "c"]
    (tmp_path / "b.summary.json").unlink()  # b was killed before its summary: b and everything after run again
    stages = run()
    assert calls == ["b", "c"] and stages.reused == ["a"] and stages.ran == ["b", "c"]
    calls.clear()
    preempted = Stages()
    result = preempted("d", tmp_path / "d", tmp_path / "d.summary.json", lambda: {"status": "preempted"})
    assert result["status"] == "preempted" and not (tmp_path / "d.summary.json").exists()  # not done


@pytest.mark.parametrize(
    "override,message",
    [
        ("bogus=1", "Key 'bogus' not in 'OnPolicyConfig'"),
        ("update=[ppo]", "update=['ppo']: a non-empty list of distinct ['dpo', 'rm']"),
        ("label.judge=gpt4", "label.judge='gpt4': expected openai:MODEL or rm:DIR"),
        ("sampling.num_samples=1", "sampling.num_samples=1: a ranking needs at least 2 answers"),
        ("dpo.export.hf=false", "dpo.export.hf=false: the next round starts from the round's dpo/hf"),
        ("dpo.model.dtype=bfloat16", "dpo.model.dtype is now dpo.runtime.dtype"),
    ],
)
def test_bad_settings_are_one_line_errors(override, message, capsys):
    from starling_jax import onpolicy

    assert onpolicy.main([override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
