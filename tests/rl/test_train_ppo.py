"""`python -m starling_jax.train_ppo` on tiny HF folders: one-line errors, exact resume, HF export, summary."""

import json
import re
import shutil
import signal
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("starling_jax.train.job", reason="train_ppo runs on the shared trainer of issue 8")

from starling_jax import train_ppo  # noqa: E402
from starling_jax.config import load_config  # noqa: E402
from starling_jax.data.tokenizer import default_tokenizer_dir  # noqa: E402
from tests.entrypoints import kill_after_metrics  # noqa: E402
from tests.rl.fixtures import QUESTIONS, narrow_policy, ppo_folders, write_prompts  # noqa: E402

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return ppo_folders(tmp_path_factory.mktemp("ppo"), layers=2)


@pytest.fixture(scope="module")
def learnable(folders, tmp_path_factory):
    """`folders` with a policy that samples almost only 16 tokens (`narrow_policy`) and 48 prompts (24 held out):
    what the short runs learn on."""
    policy, rm, _ = folders
    root = tmp_path_factory.mktemp("learnable")
    return narrow_policy(policy, root / "policy"), rm, write_prompts(root / "prompts.jsonl", repeats=6)


def base_args(folders, out, *extra):
    policy, rm, prompts = folders
    return [
        f"policy={policy}",
        f"reward_model={rm}",
        f"prompts.train={prompts}",
        f"output_dir={out}",
        "critic_init=policy",
        "prompts.eval_prompts=8",
        "rollout.batch_size=8",
        "rollout.minibatch_size=8",
        "rollout.max_new_tokens=6",
        "prompts.max_prompt_tokens=32",
        "train.progress_bar=false",
        "export.plot=false",
        *extra,
    ]


def test_recipes_load():
    from starling_jax.rl.config import PPORunConfig

    alpha = load_config(PPORunConfig, ROOT / "configs" / "ppo_openchat35_starling_alpha.yaml")
    assert (alpha.algorithm, alpha.num_layers_unfrozen, alpha.kl.coef, alpha.optim.learning_rate) == (
        "apa",
        4,
        0.01,
        2e-7,
    )
    assert alpha.rollout.stop_strings == ["GPT4 Correct User:"] and not alpha.reward_model_shares_tokenizer
    assert load_config(PPORunConfig, ROOT / "configs" / "ppo_openchat35_beta.yaml").algorithm == "ppo"


def summary_of(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "override,message",
    [
        ("policy=/nonexistent/policy", "policy=/nonexistent/policy: no such model folder"),
        ("WRONG_ROLE", r"ForSequenceClassification folder, not a \*ForCausalLM"),
        ("reward_model_shares_tokenizer=true", "different chat templates|different vocabularies"),
        ("rollout.max_new_tokens=100000", "leave no room"),
    ],
)
def test_one_line_errors(folders, tmp_path, capsys, override, message):
    policy, rm, prompts = folders
    args = base_args(folders, tmp_path / "out")
    if override == "WRONG_ROLE":
        args.append(f"policy={rm}")
    elif override == "reward_model_shares_tokenizer=true":  # an OpenChat tokenizer on the policy side
        other = tmp_path / "openchat_policy"
        shutil.copytree(policy, other)
        for f in default_tokenizer_dir("openchat_3.5", openchat_special_tokens=True).iterdir():
            shutil.copy(f, other / f.name)
        args += [f"policy={other}", override]
    else:
        args.append(override)
    assert train_ppo.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and re.search(message, err), err


@pytest.mark.slow
def test_sigterm_sigkill_and_restart_continue_the_same_run_and_export(folders, tmp_path, capsys, monkeypatch):
    # Uninterrupted: 3 iterations. Interrupted: a SIGTERM during iteration 1 (saves step 1 and exits cleanly), a
    # restart in a subprocess SIGKILLed during iteration 3 (no clean-up, its step-2 checkpoint complete), then a
    # restart from that checkpoint to 3. Every iteration's rollouts (scores, KL, response lengths) and
    # losses equal the uninterrupted run's bit for bit, and the resumed run exports.
    steps = ["train.steps=3", "train.save_every=1", "train.async_checkpointing=false"]
    straight = tmp_path / "straight"
    assert train_ppo.main(base_args(folders, straight, *steps)) == 0
    s = summary_of(capsys)
    assert s["status"] == "completed" and s["steps"] == 3 and s["algorithm"] == "ppo"
    for key in ("output_dir", "reward_start", "reward_end", "kl_end", "hf_export_dir"):
        assert key in s

    # SIGTERM (a real signal to this process, raised inside iteration 1 so that the run's handler is installed)
    from starling_jax.rl.job import PPOJob

    original = PPOJob.iteration

    def step_then_sigterm(self, *args):
        out = original(self, *args)
        signal.raise_signal(signal.SIGTERM)
        return out

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as m:
        m.setattr(PPOJob, "iteration", step_then_sigterm)
        assert train_ppo.main(base_args(folders, resumed, *steps)) == 0
    t = summary_of(capsys)
    assert t["status"] == "preempted" and t["steps"] == 1 and t["hf_export_dir"] is None, t
    assert sorted(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit()) == [1]

    # SIGKILL (the same 8 simulated devices as this process, so that the programs are the same)
    kill_after_metrics(
        [sys.executable, "-m", "starling_jax.train_ppo", *base_args(folders, resumed, *steps)],
        resumed,
        rows=2,
        timeout=300,
        devices=jax.device_count(),
        checkpoint=2,
    )
    r_args = base_args(folders, resumed, *steps)
    assert train_ppo.main(r_args) == 0
    r = summary_of(capsys)
    assert r["status"] == "completed" and r["resumed_from"] == 2, r

    def rows(d):  # step → row; a restart rewrites the steps after its checkpoint: the newest row wins
        return {json.loads(x)["step"]: json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()}

    a, b = rows(straight), rows(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    keys = [k for k in a[3] if k.startswith("rollout/") and k not in ("rollout/tokens_per_s",)] + ["loss"]
    assert {"rollout/score_raw", "rollout/kl", "rollout/response_length", "rollout/entropy"} <= set(keys)
    for step in (1, 2, 3):
        assert {k: b[step][k] for k in keys} == {k: a[step][k] for k in keys}, step
    assert a[2]["rollout/score_raw"] != a[3]["rollout/score_raw"]  # the iterations differ: not a constant compared
    assert (r["reward_start"], r["reward_end"], r["kl_end"]) == (s["reward_start"], s["reward_end"], s["kl_end"])
    assert r["hf_export_dir"] and (resumed / "hf" / "config.json").is_file()

    # The exported policy loads in transformers; its greedy completions equal our sampler's on the export.
    import torch
    import transformers

    from starling_jax.model import hf_io
    from starling_jax.parallel import sharding
    from starling_jax.sample.engine import SamplingConfig, make_sampler

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        r["hf_export_dir"], dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(r["hf_export_dir"])
    ids = tok("[INST] Name a colour. [/INST]", add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        want = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
        )[0, len(ids) :].tolist()
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    _, graphdef, params = hf_io.load_hf(r["hf_export_dir"], "causal_lm", mesh)
    out = make_sampler(graphdef, SamplingConfig(max_new_tokens=5, temperature=0.0), mesh)(
        params,
        jax.numpy.asarray([ids], jax.numpy.int32),
        jax.numpy.asarray([len(ids)], jax.numpy.int32),
        jax.numpy.zeros((1,), jax.numpy.int32),
        jax.random.key(0),
    )
    assert np.asarray(out.tokens)[0].tolist() == want


# Per algorithm, what the short run adds to the embedded defaults. GRPO / RLOO (critic-free; tests/rl/test_grpo.py):
# 2 and 4 prompts × 4 answers per iteration (RLOO with trl's batch-scaled advantages at β 0.05); slow: 8 iterations
# of train_ppo on the tiny folders take 45-100 s on the loaded 2-core machine.
SHORT_RUN = {
    "ppo": ["optim.learning_rate=3e-3"],
    "apa": ["optim.learning_rate=2e-3"],
    "grpo": ["rollout.group_size=4"],
    "rloo": ["kl.coef=0.05", "advantage.scale_rewards=batch", "rollout.batch_size=16", "rollout.group_size=4"],
}


@pytest.mark.parametrize(
    "algorithm", ["ppo", "apa", *(pytest.param(a, marks=pytest.mark.slow) for a in ("grpo", "rloo"))]
)
def test_short_run_raises_held_out_reward(learnable, tmp_path, capsys, algorithm):
    # 8 iterations on 24 training prompts raise the mean reward of the 24 held-out prompts' rollouts (fixed sampling
    # keys: an update that changes nothing gives exactly reward_end == reward_start) by more than 0.05, and the KL
    # to the reference stays bounded. The policy samples almost only 16 tokens (`learnable`): with the plain random
    # policy (near-uniform over 32000 tokens) nothing learnt reaches held-out prompts, and the held-out reward
    # merely moved with the samples (64 held-out prompts: −0.02 to +0.06 for every algorithm and seed; 8: anywhere
    # in ±0.2, so any float change flipped the test). Measured here, seeds 0 / 1 / 2 (the test runs seed 0), rise
    # and KL per 6-token answer: PPO +0.16 / +0.19 / +0.29 (KL ≤ 4.6), APA +0.42 / +0.20 / +0.26 (≤ 4.4), GRPO
    # +0.09 / +0.19 / +0.15 (≤ 2.8), RLOO +0.49 / +0.28 / +0.46 (≤ 6.2).
    args = base_args(
        learnable,
        tmp_path / algorithm,
        f"algorithm={algorithm}",
        *SHORT_RUN[algorithm],
        "prompts.eval_prompts=24",
        "train.steps=8",
        "train.eval_every=100",
        "train.save_every=100",
        "export.hf=false",
    )
    assert train_ppo.main(args) == 0
    s = summary_of(capsys)
    assert s["algorithm"] == algorithm, s
    assert s["reward_end"] > s["reward_start"] + 0.05, s
    assert s["kl_end"] < 10.0, s


def test_rollout_cut_at_a_stop_string_trains_and_scores_the_answer_plus_eos(folders, tmp_path, monkeypatch):
    # The sampler is replaced by crafted outputs (the tiny random policy would almost never say the stop string).
    # Run A: rows that end on "GPT4 Correct User:" (the sampler's token-level stop), that carry it split into
    # byte tokens (the sampler ran on to the length budget), that end on EOS, or that have no stop string. Run B:
    # the same rows as if the policy had sampled EOS right after each answer. Through the job's rollout → score →
    # experience path both give the same rollout batch, the same reward-model inputs (re-rendered text and
    # shared-tokenizer tokens), the same scores and the same experience: the stop string is in neither the
    # trained response nor the reward model's text, and both end at the answer followed by EOS (as thwu1/trlx).
    import jax.numpy as jnp

    from starling_jax.parallel import sharding
    from starling_jax.rl import job as job_lib
    from starling_jax.rl.config import PPORunConfig
    from starling_jax.sample.engine import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, SampleOutput
    from starling_jax.train.state import abstract_train_state, build_train_state

    stop, t = "GPT4 Correct User:", 24
    cfg = load_config(
        PPORunConfig,
        None,
        base_args(folders, tmp_path / "out", f'rollout.stop_strings=["{stop}"]', f"rollout.max_new_tokens={t}"),
    )
    job = job_lib.PPOJob(cfg)
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    setup = job.setup(mesh)
    state, shardings = build_train_state(
        setup.params, setup.params_shardings, setup.optimizer.tx, mesh, cfg.seed, setup.extra_state
    )
    programs = job.steps(mesh, setup, abstract_train_state(state, shardings)).train.args[0]  # the run's programs
    tok, pad = job.tokenizer, job.sampling.pad_token_id
    eos = tok.eos_token_id
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    byte_stop = tok.convert_tokens_to_ids([f"<0x{c:02X}>" for c in stop.encode()])
    long_row = enc(" ".join(QUESTIONS))[:t]  # a row cut by the length budget
    sampled = [
        (enc(f"Paris is the capital.\n{stop}"), FINISH_STOP),
        ((enc("Sure") + byte_stop)[:t], FINISH_LENGTH),
        (enc("Blue") + [eos], FINISH_EOS),
        (long_row, FINISH_LENGTH),
    ] * 2
    as_if_eos = [
        (enc("Paris is the capital.") + [eos], FINISH_EOS),
        (enc("Sure") + [eos], FINISH_EOS),
        (enc("Blue") + [eos], FINISH_EOS),
        (long_row, FINISH_LENGTH),
    ] * 2

    def fake_sampler(spec):
        def sample(params, prompts, lengths, row_ids, key):
            tokens = np.full((len(spec), t), pad, np.int32)
            for i, (ids, _) in enumerate(spec):
                tokens[i, : len(ids)] = ids
            zeros = np.zeros((len(spec), t), np.float32)
            return SampleOutput(
                tokens,
                np.array([len(ids) for ids, _ in spec], np.int32),
                np.array([r for _, r in spec], np.int32),
                zeros,
                zeros,
            )

        return sample

    seen = {}

    def spy(name):
        real = getattr(job_lib, name)

        def call(*args, **kwargs):
            seen[name] = (args, kwargs, real(*args, **kwargs))
            return seen[name][2]

        monkeypatch.setattr(job_lib, name, call)

    spy("rm_batch_from_text")
    spy("rm_batch_from_tokens")
    rows, params = np.arange(8), state["params"]

    def run(spec):
        batch, _, completions = job._rollout(fake_sampler(spec), mesh, params["actor"], rows, jax.random.key(0))
        raw = job._score(programs.rewards, mesh, setup.frozen["reward"], rows, completions)
        exp, _, _ = programs.experience(
            params,
            setup.frozen["reference"],
            state["reward_stats"],
            state["kl_coef"],
            batch,
            jnp.asarray(raw),
            jnp.asarray(completions.ended),
        )
        texts, rm_text_batch = seen["rm_batch_from_text"][0][3], seen["rm_batch_from_text"][2][0]
        with monkeypatch.context() as m:  # the shared-tokenizer path on the same completions
            m.setattr(job.cfg, "reward_model_shares_tokenizer", True)
            raw_shared = job._score(programs.rewards, mesh, setup.frozen["reward"], rows, completions)
        return {
            "batch": batch,
            "completions": completions,
            "raw": raw,
            "exp": jax.device_get(exp),
            "texts": texts,
            "rm_text_batch": rm_text_batch,
            "rm_generated": seen["rm_batch_from_tokens"][0][1],
            "raw_shared": raw_shared,
        }

    a, b = run(sampled), run(as_if_eos)
    p = cfg.prompts.max_prompt_tokens
    answer = enc("Paris is the capital.") + [eos]
    # the trained response: answer + EOS, the mask ends there; rows without a stop string are as sampled
    assert a["batch"]["tokens"][0, p : p + len(answer)].tolist() == answer
    assert a["batch"]["mask"][0].sum() == len(answer) < len(sampled[0][0])
    assert a["batch"]["tokens"][1, p : p + 2].tolist() == enc("Sure") + [eos] and a["batch"]["mask"][1].sum() == 2
    assert a["batch"]["tokens"][3, p:].tolist() == long_row and a["batch"]["mask"][3].sum() == t
    assert a["completions"].ended.tolist() == [True, True, True, False] * 2
    # the reward model's text and tokens: the answer, never the stop string
    assert a["texts"][:3] == ["Paris is the capital.", "Sure", "Blue"]
    rendered = tok.decode(a["rm_text_batch"]["tokens"][0, : a["rm_text_batch"]["reward_index"][0] + 1])
    assert stop not in rendered and "GPT4" not in rendered and "Paris is the capital." in rendered, rendered
    assert a["rm_generated"][0] == answer and a["rm_generated"][1] == enc("Sure") + [eos]
    # ... exactly as if the policy had ended each answer with EOS itself
    for key in ("tokens", "positions", "segment_ids", "mask"):
        np.testing.assert_array_equal(a["batch"][key], b["batch"][key], err_msg=key)
    assert a["texts"] == b["texts"] and a["rm_generated"] == b["rm_generated"]
    np.testing.assert_array_equal(a["rm_text_batch"]["tokens"], b["rm_text_batch"]["tokens"])
    np.testing.assert_array_equal(a["raw"], b["raw"])
    np.testing.assert_array_equal(a["raw_shared"], b["raw_shared"])
    for key in a["exp"]:
        np.testing.assert_array_equal(a["exp"][key], b["exp"][key], err_msg=key)
