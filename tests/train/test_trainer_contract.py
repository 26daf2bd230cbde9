"""One trainer contract: the RM, SFT, DPO and PPO jobs (and the critic-free GRPO case) run two steps each through
the same `loop.run`, whose one state builder (`state.build_train_state`) makes their state and whose one guarded
update (`step.apply_update`) makes every optimizer update: the rng advances by one split per applied update
(checked against a chain of `jax.random.split` from the state before the step) and the learning rate is logged in
every metrics row. `aot` asks each job the same question (`aot.abstract_programs`)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from starling_jax.config import load_config
from starling_jax.data.chat import to_hh
from starling_jax.data.synthetic import generate, write_jsonl
from starling_jax.data.tokenizer import default_tokenizer_dir
from starling_jax.train import loop
from starling_jax.train.job import JobSetup
from tests.model.hf_fixtures import make_hf_model

COMMON = [
    "train.steps=2",
    "train.log_every=1",
    "train.eval_every=2",
    "train.save_every=2",
    "train.eval_max_batches=1",
    "train.progress_bar=false",
    "export.hf=false",
    "export.plot=false",
]
DATA = ["data.batch_size=8", "data.eval_batch_size=8", "data.eval_fraction=0.2", "data.max_length=128"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    data = write_jsonl(generate(40, seed=7), root / "rankings.jsonl")
    tok = default_tokenizer_dir("llama2_chat")
    policy = make_hf_model(root / "policy", "mistral", head="lm", vocab=32000, layers=1, sliding_window=4096)
    rm = make_hf_model(root / "rm", "llama", head="score", vocab=32000, layers=1, seed=1)
    for folder in (policy, rm):
        for f in tok.iterdir():
            shutil.copy(f, folder / f.name)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": to_hh([{"role": "user", "content": f"Say {i}."}])}) + "\n" for i in range(24))
    )
    return {"data": data, "policy": policy, "rm": rm, "prompts": prompts}


def rm_job(files, out):
    from starling_jax.train.rm_config import RMRunConfig
    from starling_jax.train.rm_job import RMJob

    args = [f"data.train={files['data']}", *DATA]
    return RMJob(load_config(RMRunConfig, None, [f"output_dir={out}", *COMMON, *args]))


def sft_job(files, out):
    from starling_jax.train.sft_config import SFTRunConfig
    from starling_jax.train.sft_job import SFTJob

    args = [f"data.train={files['data']}", *DATA]
    return SFTJob(load_config(SFTRunConfig, None, [f"output_dir={out}", *COMMON, *args]))


def dpo_job(files, out):
    from starling_jax.train.dpo_config import DPORunConfig
    from starling_jax.train.dpo_job import DPOJob

    args = [
        f"policy={files['policy']}",
        f"data.train={files['data']}",
        "data.layout=per_answer",  # shared-prefix rows are not split over the tests' 8 devices
        *DATA,
    ]
    return DPOJob(load_config(DPORunConfig, None, [f"output_dir={out}", *COMMON, *args]))


def ppo_job(files, out, *extra):
    from starling_jax.rl.config import PPORunConfig
    from starling_jax.rl.job import PPOJob

    args = [
        f"policy={files['policy']}",
        f"reward_model={files['rm']}",
        f"prompts.train={files['prompts']}",
        "critic_init=policy",
        "prompts.eval_prompts=8",
        "rollout.batch_size=8",  # the tests' 8 devices
        "rollout.minibatch_size=8",
        "rollout.epochs=2",  # two updates per iteration: the rng advances twice
        "rollout.max_new_tokens=4",
        "prompts.max_prompt_tokens=32",
        *extra,
    ]
    return PPOJob(load_config(PPORunConfig, None, [f"output_dir={out}", *COMMON, *args]))


def grpo_job(files, out):
    """The critic-free RL case: 4 prompts × 2 answers, the actor alone in the state."""
    return ppo_job(files, out, "algorithm=grpo", "rollout.group_size=2")


JOBS = {"rm": rm_job, "sft": sft_job, "dpo": dpo_job, "ppo": ppo_job, "grpo": grpo_job}
RL = ("ppo", "grpo")


def split_chain(rng: np.ndarray, n: int) -> np.ndarray:
    """The state's rng after `n` applied updates, each keeping the first half of a split."""
    key = jax.random.wrap_key_data(rng)
    for _ in range(n):
        key = jax.random.split(key)[0]
    return np.asarray(jax.random.key_data(key))


# ~15-50 s each here (2 steps, an eval and a checkpoint on 8 simulated devices; the first pays the imports): the
# same code path every trainer runs, end to end, is what this test is about.
@pytest.mark.parametrize("name", list(JOBS))
def test_each_job_runs_two_steps_through_the_one_loop(name, files, tmp_path, monkeypatch):
    out = tmp_path / name
    job = JOBS[name](files, out)
    built, seen = [], []

    real_build = loop.build_train_state

    def build(*args, **kwargs):  # the loop's one state builder
        state, shardings = real_build(*args, **kwargs)
        built.append(state)
        return state, shardings

    monkeypatch.setattr(loop, "build_train_state", build)
    real_setup, real_steps = job.setup, job.steps

    def setup(mesh):
        value = real_setup(mesh)
        assert isinstance(value, JobSetup)  # a typed value, nothing left on the job for the loop to read
        return value

    def steps(mesh, setup, state):
        made = real_steps(mesh, setup, state)

        def train(state, frozen, host_batch):
            before = jax.device_get((state["rng"], state["step"]))  # read before the step donates the state
            new_state, metrics, tokens = made.train(state, frozen, host_batch)
            after = jax.device_get((new_state["rng"], new_state["step"]))
            seen.append((np.asarray(before[0]), int(before[1]), np.asarray(after[0]), int(after[1])))
            return new_state, metrics, tokens

        return dataclasses.replace(made, train=train)

    monkeypatch.setattr(job, "setup", setup)
    monkeypatch.setattr(job, "steps", steps)
    summary = loop.run(job)

    assert summary["status"] == "completed" and summary["steps"] == 2 and len(built) == 1
    assert len(seen) == 2
    updates_per_step = job.updates_per_step if name in RL else 1
    for rng_before, step_before, rng_after, step_after in seen:
        assert step_after - step_before == updates_per_step  # every update applied (all finite)
        assert not np.array_equal(rng_before, rng_after)
        np.testing.assert_array_equal(rng_after, split_chain(rng_before, updates_per_step))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert np.isfinite(row["learning_rate"]) and row["learning_rate"] >= 0
        assert {"loss", "grad_norm", "grad_norm_clipped"} <= set(row)


@pytest.mark.parametrize("name", list(JOBS))
def test_aot_asks_every_job_the_same_question(name, files, tmp_path):
    """`aot.abstract_programs`: the job's architectures → its abstract set-up → the loop's state builder → its
    programs, for every job alike (abstract only: nothing compiled or allocated)."""
    from starling_jax import aot
    from starling_jax.parallel import sharding

    job = JOBS[name](files, tmp_path / name)
    if name == "dpo":  # aot compiles DPO's step with precomputed reference log-probs
        job.cfg.reference_logps = "precompute"
    mesh = sharding.make_mesh(job.cfg.mesh)
    setup, state, programs = aot.abstract_programs(job, mesh, num_layers=1)
    update = programs["update"]
    assert update.donated is state and update.args[0] is state
    assert {"step", "params", "opt_state", "rng"} <= set(state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    trainable = [m.name for m in setup.models if m.trainable]
    expected = {"ppo": ["actor", "critic"], "grpo": ["actor"]}.get(name, [setup.models[0].name])
    assert trainable == expected and set(state["params"]) >= ({"actor"} if name in RL else set())
    assert ("eval" in programs) == (name not in RL) and ("rollout" in programs) == (name in RL)
