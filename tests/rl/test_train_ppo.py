"""`python -m starling_jax.train_ppo` on tiny HF folders: one-line errors, exact resume, HF export, summary."""

import json
import re
import shutil

import numpy as np
import pytest

pytest.importorskip("starling_jax.train.job", reason="train_ppo runs on the shared trainer of issue 8")

from starling_jax import train_ppo  # noqa: E402
from starling_jax.config import load_config  # noqa: E402
from starling_jax.data.chat import to_hh  # noqa: E402
from starling_jax.tokenizer import default_tokenizer_dir  # noqa: E402
from tests.model.hf_fixtures import make_hf_model  # noqa: E402

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]

QUESTIONS = ["What is the capital of France?", "Name a colour.", "Tell me a joke.", "How are you?",
             "What is two plus two?", "Say hello.", "Who wrote Hamlet?", "Give me a number."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    tok = default_tokenizer_dir("llama2_chat")
    policy = make_hf_model(root / "policy", "mistral", head="lm", vocab=32000, layers=2, sliding_window=4096)
    rm = make_hf_model(root / "rm", "llama", head="score", vocab=32000, layers=2, seed=1)
    for folder in (policy, rm):
        for f in tok.iterdir():
            shutil.copy(f, folder / f.name)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": to_hh([{"role": "user", "content": f"{q} ({i})"}])}) + "\n"
                               for i in range(3) for q in QUESTIONS))
    return policy, rm, prompts


def base_args(folders, out, *extra):
    policy, rm, prompts = folders
    return [f"policy={policy}", f"reward_model={rm}", f"prompts.train={prompts}", f"output_dir={out}",
            "critic_init=policy", "prompts.eval_prompts=8", "rollout.batch_size=8", "rollout.minibatch_size=8",
            "rollout.max_new_tokens=6", "prompts.max_prompt_tokens=32", "train.progress_bar=false",
            "export.plot=false", *extra]


def test_recipes_load():
    from starling_jax.rl.config import PPORunConfig

    alpha = load_config(PPORunConfig, ROOT / "configs" / "ppo_openchat35_starling_alpha.yaml")
    assert (alpha.algorithm, alpha.num_layers_unfrozen, alpha.kl.coef, alpha.optim.learning_rate) == ("apa", 4, 0.01,
                                                                                                    2e-7)
    assert alpha.rollout.stop_strings == ["GPT4 Correct User:"] and not alpha.reward_model_shares_tokenizer
    assert load_config(PPORunConfig, ROOT / "configs" / "ppo_openchat35_beta.yaml").algorithm == "ppo"


def summary_of(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("override,message", [
    ("policy=/nonexistent/policy", "policy=/nonexistent/policy: no HF model folder"),
    ("WRONG_ROLE", r"ForSequenceClassification folder, not a \*ForCausalLM"),
    ("reward_model_shares_tokenizer=true", "different chat templates|different vocabularies"),
    ("rollout.max_new_tokens=100000", "leave no room"),
])
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
def test_resume_continues_the_same_run_and_exports(folders, tmp_path, capsys):
    # Uninterrupted: 3 iterations. Interrupted: 2 iterations (checkpoint at 2), then resumed to 3. The third
    # iteration's rollouts (their mean raw score and KL) and the final policy are the same.
    straight = tmp_path / "straight"
    assert train_ppo.main(base_args(folders, straight, "train.steps=3", "train.save_every=1")) == 0
    s = summary_of(capsys)
    assert s["status"] == "completed" and s["steps"] == 3 and s["algorithm"] == "ppo"
    for key in ("output_dir", "reward_start", "reward_end", "kl_end", "hf_export_dir"):
        assert key in s
    resumed = tmp_path / "resumed"
    assert train_ppo.main(base_args(folders, resumed, "train.steps=2", "train.save_every=1")) == 0
    capsys.readouterr()
    assert train_ppo.main(base_args(folders, resumed, "train.steps=3", "train.save_every=1")) == 0
    r = summary_of(capsys)
    assert r["resumed_from"] == 2
    rows = lambda d: {json.loads(x)["step"]: json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()}  # noqa: E731
    a, b = rows(straight)[3], rows(resumed)[3]
    for key in ("rollout/score_raw", "rollout/kl", "loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert r["reward_end"] == pytest.approx(s["reward_end"], rel=1e-5)

    # The exported policy loads in transformers; its greedy completions equal our sampler's on the export.
    import jax
    import torch
    import transformers

    from starling_jax.model import hf_io
    from starling_jax.parallel import sharding
    from starling_jax.sample.engine import SamplingConfig, make_sampler

    hf = transformers.AutoModelForCausalLM.from_pretrained(s["hf_export_dir"], dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(s["hf_export_dir"])
    ids = tok("[INST] Name a colour. [/INST]", add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                           max_new_tokens=5, min_new_tokens=5, do_sample=False)[0, len(ids):].tolist()
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    _, graphdef, params = hf_io.load_hf(s["hf_export_dir"], "causal_lm", mesh)
    out = make_sampler(graphdef, SamplingConfig(max_new_tokens=5, temperature=0.0), mesh)(
        params, jax.numpy.asarray([ids], jax.numpy.int32), jax.numpy.asarray([len(ids)], jax.numpy.int32),
        jax.numpy.zeros((1,), jax.numpy.int32), jax.random.key(0))
    assert np.asarray(out.tokens)[0].tolist() == want


@pytest.mark.parametrize("algorithm", ["ppo", "apa"])
def test_short_run_raises_held_out_reward(folders, tmp_path, capsys, algorithm):
    # The tiny setup: a random policy and a random reward model (its score is still a fixed function of the text).
    # The held-out rollouts use fixed sampling keys, so an update that changes nothing (lr → 0) gives exactly
    # reward_end == reward_start; 8 iterations of the embedded defaults (centred scores, whitened advantages)
    # measured +0.19 (PPO) from −0.552. Margin 0.05 (about a third of the RM's score spread across rollouts);
    # KL per sequence (6 tokens) stays below 3 nats.
    args = base_args(folders, tmp_path / algorithm, f"algorithm={algorithm}", "train.steps=8", "train.eval_every=100",
                     "train.save_every=100", "export.hf=false")
    assert train_ppo.main(args) == 0
    s = summary_of(capsys)
    assert s["reward_end"] > s["reward_start"] + 0.05, s
    assert s["kl_end"] < 3.0, s
