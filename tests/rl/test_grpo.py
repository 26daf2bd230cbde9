"""`train_ppo algorithm=grpo | rloo`: group advantages and losses against trl's own code, no critic anywhere (state,
checkpoint, aot set), exact resume after a preemption, one-line config errors, and a short run that raises the held-out
reward. The tiny HF folders and helpers are test_train_ppo.py's."""

import collections
import inspect
import json
import signal
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from starling_jax import train_ppo
from starling_jax.config import load_config
from starling_jax.errors import ConfigError
from starling_jax.rl import experience as exp_lib
from starling_jax.rl import losses
from starling_jax.rl.config import PPORunConfig
from starling_jax.rl.kl import KLConfig
from starling_jax.rl.rewards import RewardConfig, init_reward_stats
from tests.rl.test_train_ppo import base_args, folders, summary_of  # noqa: F401 (folders: a fixture)
from tests.test_aot import _hf_config, rl_role_bytes_per_device, run_aot

torch = pytest.importorskip("torch")
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
trl_rloo = pytest.importorskip("trl.trainer.rloo_trainer")
from trl.trainer.utils import nanstd  # noqa: E402


def trl_block(cls, method: str, first: str, last: str) -> types.CodeType:
    """The lines of trl's `cls.method` from the one starting with `first` to the one starting with `last`
    (inclusive), dedented and compiled: trl's own code, run on our inputs (not a transcription)."""
    lines = inspect.getsource(getattr(cls, method)).splitlines()
    start = next(i for i, x in enumerate(lines) if x.strip().startswith(first))
    end = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(last))
    return compile(textwrap.dedent("\n".join(lines[start : end + 1])), f"<trl {cls.__name__}.{method}>", "exec")


def _run_trl_block(cls, first: str, last: str, rewards: np.ndarray, group_size: int, **trainer_attrs) -> np.ndarray:
    """Runs the lines `first`..`last` of trl's `cls._generate_and_score_completions` on `rewards` → its advantages."""
    code = trl_block(cls, "_generate_and_score_completions", first, last)
    scope = {
        "torch": torch,
        "nanstd": nanstd,
        "rewards": torch.tensor(rewards, dtype=torch.float32),
        "num_generations": group_size,
        "self": types.SimpleNamespace(**trainer_attrs),
    }
    exec(code, scope)
    return scope["advantages"].numpy()


def trl_grpo_advantages(rewards: np.ndarray, group_size: int, scale_rewards: str) -> np.ndarray:
    first = "mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)"
    last = "is_std_zero = torch.isclose(std_rewards"
    return _run_trl_block(trl_grpo.GRPOTrainer, first, last, rewards, group_size, scale_rewards=scale_rewards)


def trl_rloo_advantages(rewards: np.ndarray, group_size: int, normalize: bool) -> np.ndarray:
    first = "grouped_rewards = rewards.view(-1, num_generations)"
    last = "advantages = torch.nan_to_num(advantages, nan=0.0)"
    return _run_trl_block(trl_rloo.RLOOTrainer, first, last, rewards, group_size, normalize_advantages=normalize)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [2, 4])
def test_grpo_advantages_equal_trl(scale_rewards, group_size):
    rewards = np.random.default_rng(group_size).normal(0.3, 1.5, 24).astype(np.float32)
    rewards[:group_size] = 0.7  # a group of equal rewards: std 0, advantage 0
    ours = exp_lib.grpo_advantages(jnp.asarray(rewards), group_size, scale_rewards, eps=1e-4)
    np.testing.assert_allclose(np.asarray(ours), trl_grpo_advantages(rewards, group_size, scale_rewards), atol=2e-5)


@pytest.mark.parametrize("scale_rewards", ["none", "batch"])
@pytest.mark.parametrize("group_size", [2, 3])
def test_rloo_advantages_equal_trl(scale_rewards, group_size):
    rewards = np.random.default_rng(group_size).normal(-0.2, 2.0, 18).astype(np.float32)
    ours = exp_lib.rloo_advantages(jnp.asarray(rewards), group_size, scale_rewards, eps=1e-4)
    want = trl_rloo_advantages(rewards, group_size, normalize=scale_rewards == "batch")
    np.testing.assert_allclose(np.asarray(ours), want, atol=2e-5)


def test_group_advantage_is_broadcast_over_tokens_or_takes_the_kl_reward_to_go():
    # A_t = a_b − β Σ_{t'≥t} kl_t' (KL in the reward), = a_b on every token with kl.in_loss; brute force per row.
    rng = np.random.default_rng(0)
    b, t, g, beta = 8, 5, 4, 0.3
    lengths = rng.integers(1, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    logp, ref = rng.normal(-2, 0.5, (b, t)).astype(np.float32), rng.normal(-2, 0.5, (b, t)).astype(np.float32)
    scores = rng.normal(0, 1, b).astype(np.float32)
    forward = {"logprobs": jnp.asarray(logp), "ref_logprobs": jnp.asarray(ref), "entropy": jnp.zeros((b, t))}

    def experience(in_loss):
        exp, _, _ = exp_lib.make_experience(
            forward,
            jnp.asarray(mask),
            jnp.asarray(scores),
            jnp.ones((b,), bool),
            jnp.float32(beta),
            init_reward_stats(),
            kl_cfg=KLConfig(coef=beta),
            reward_cfg=RewardConfig(normalize="none"),
            adv_cfg=exp_lib.AdvantageConfig(scale_rewards="group"),
            algorithm="grpo",
            group_size=g,
            kl_in_loss=in_loss,
        )
        return exp

    seq = np.asarray(exp_lib.grpo_advantages(jnp.asarray(scores), g, "group"))
    kl = (logp - ref) * mask
    want = np.array([[seq[i] - beta * kl[i, j:].sum() if mask[i, j] else 0.0 for j in range(t)] for i in range(b)])
    penalty = experience(False)
    np.testing.assert_allclose(np.asarray(penalty["advantages"]), want, atol=1e-5)
    assert "old_values" not in penalty and "returns" not in penalty
    np.testing.assert_allclose(np.asarray(experience(True)["advantages"]), seq[:, None] * mask, atol=1e-6)


class _Accelerator:
    num_processes = 1
    reduce = staticmethod(lambda x, reduction="sum": x)
    gather = staticmethod(lambda x: x)
    gather_for_metrics = staticmethod(lambda x: x)
    sync_gradients = True


def trl_grpo_loss(logp, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, max_len):
    """trl's `GRPOTrainer._compute_loss` itself on a stub trainer whose model forward returns `logp`."""
    logp_t = torch.tensor(logp, requires_grad=True)
    stub = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp_t, torch.zeros_like(logp_t), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None),
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        _entropy_bonus_enabled=False,
        accelerator=_Accelerator(),
        _metrics={"train": collections.defaultdict(list)},
    )
    b, t = logp.shape
    inputs = {
        "prompt_ids": torch.zeros((b, 1), dtype=torch.long),
        "prompt_mask": torch.ones((b, 1), dtype=torch.long),
        "completion_ids": torch.zeros((b, t), dtype=torch.long),
        "completion_mask": torch.tensor(mask),
        "advantages": torch.tensor(adv),
        "old_per_token_logps": torch.tensor(old),
        "ref_per_token_logps": torch.tensor(ref),
        "num_items_in_batch": torch.tensor(mask.sum()),
    }
    loss = trl_grpo.GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    return float(loss), logp_t.grad.numpy()


@pytest.mark.parametrize(
    "aggregation,loss_type", [("token_mean", "bnpo"), ("sequence_mean", "grpo"), ("constant", "dr_grpo")]
)
@pytest.mark.parametrize("in_loss", [False, True])
def test_grpo_loss_and_gradient_equal_trl(aggregation, loss_type, in_loss):
    # Asymmetric clip (ε_low 0.2, ε_high 0.28, DAPO's), ratios spread past both bounds, the k3 KL in the loss or not.
    rng = np.random.default_rng(1)
    b, t, beta = 6, 7, 0.05
    lengths = np.array([7, 1, 4, 6, 3, 7])
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    old = rng.normal(-2, 0.3, (b, t)).astype(np.float32)
    logp = (old + rng.normal(0, 0.3, (b, t))).astype(np.float32)
    ref = (old + rng.normal(0, 0.2, (b, t))).astype(np.float32)
    adv = rng.normal(0, 1, b).astype(np.float32)
    kl_beta = beta if in_loss else 0.0
    want, want_grad = trl_grpo_loss(logp, old, ref, adv[:, None], mask, loss_type, 0.2, 0.28, kl_beta, t)
    cfg = losses.LossConfig(clip_low=0.2, clip_high=0.28, aggregation=aggregation)
    batch = {
        "old_logprobs": jnp.asarray(old),
        "ref_logprobs": jnp.asarray(ref),
        "advantages": jnp.asarray(np.repeat(adv[:, None], t, 1) * mask),
        "mask": jnp.asarray(mask),
    }

    def loss_of(lp):
        return losses.actor_critic_loss(cfg, "grpo", lp, jnp.zeros((b, t)), None, batch, beta, in_loss)[0]

    got, grad = jax.value_and_grad(loss_of)(jnp.asarray(logp))
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad) * mask, want_grad * mask, rtol=1e-4, atol=1e-6)


def test_k3_formula():
    logp, ref = jnp.asarray([-1.0, -0.5, -3.0]), jnp.asarray([-1.2, -0.5, -1.0])
    d = np.asarray(ref) - np.asarray(logp)
    np.testing.assert_allclose(np.asarray(losses.k3_kl_loss(logp, ref)), np.exp(d) - d - 1, rtol=1e-6)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["algorithm=grpo", "rollout.group_size=1"], "rollout.group_size=1"),
        (["algorithm=rloo", "rollout.group_size=1"], "rollout.group_size=1"),
        (["algorithm=grpo", "rollout.group_size=3"], "rollout.batch_size=16 is not a multiple of rollout.group_size"),
        (["algorithm=grpo", "advantage.scale_rewards=std"], "advantage.scale_rewards='std'"),
        (["algorithm=rloo", "advantage.scale_rewards=group"], "advantage.scale_rewards=group"),
        (["algorithm=grpo", "loss.aggregation=mean"], "loss.aggregation='mean'"),
        (["algorithm=grpo", "critic_init=reward"], "critic_init"),
        (["algorithm=apa", "kl.in_loss=true"], "kl.in_loss"),
        (["algorithm=dpo"], "algorithm='dpo'"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(PPORunConfig, None, overrides)
    assert key in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_group_size_defaults_per_algorithm():
    assert load_config(PPORunConfig, None, []).group_size == 1
    assert load_config(PPORunConfig, None, ["algorithm=grpo"]).group_size == 4
    assert load_config(PPORunConfig, None, ["algorithm=rloo", "rollout.group_size=2"]).group_size == 2
    assert load_config(PPORunConfig, None, ["algorithm=grpo"]).rollout.group_size == 0  # a saved config follows it
    assert load_config(PPORunConfig, None, ["algorithm=rloo"]).output_dir == "runs/rloo_default"
    assert load_config(PPORunConfig, None, ["algorithm=grpo", "output_dir=x"]).output_dir == "x"


def test_group_rows_are_distinct_draws_seeded_as_generate_num_samples():
    from starling_jax.rl.job import PPOJob

    overrides = ["algorithm=grpo", "rollout.group_size=3", "rollout.batch_size=6", "rollout.minibatch_size=6"]
    job = PPOJob(load_config(PPORunConfig, None, overrides))
    job.conversations = [None] * 10
    rows, seeds = job.group_rows(np.array([7, 2]))
    assert rows.tolist() == [7, 7, 7, 2, 2, 2]
    assert seeds.tolist() == [7, 17, 27, 2, 12, 22]  # answer j of row r: j·N + r (sample/chat.py's row ids)


def test_grpo_abstract_set_has_no_critic():
    from starling_jax.model.config import ModelConfig
    from starling_jax.parallel import sharding
    from starling_jax.rl import abstract
    from starling_jax.rl.job import PPOJob

    tiny = ModelConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    cfg = load_config(
        PPORunConfig,
        None,
        ["algorithm=grpo", "rollout.batch_size=8", "rollout.minibatch_size=4", "rollout.max_new_tokens=4",
         "prompts.max_prompt_tokens=8", "prompts.eval_prompts=4"],
    )  # fmt: skip
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    job = PPOJob(cfg)
    rl = abstract.build(job, mesh, tiny, tiny)
    assert set(rl.state["params"]) == {"actor"} and set(rl.models) == {"actor", "reward"}
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(rl.state)[0]]
    assert paths and not any("critic" in p for p in paths)
    update = next(p for p in rl.programs if p.name == "update")
    assert "old_values" not in update.args[1] and "returns" not in update.args[1]
    ppo = abstract.build(PPOJob(load_config(PPORunConfig, None, [])), mesh, tiny, tiny)
    assert set(ppo.state["params"]) == {"actor", "critic"}  # the same builder still makes PPO's critic


@pytest.mark.slow  # compiles the experience and update programs in an aot subprocess (~40 s idle, 2 min loaded)
def test_aot_grpo_counts_no_critic(tmp_path):
    # test_aot's PPO check for GRPO: from config.json files alone on 4 CPU devices, the experience and update
    # programs compile; the roles are the analytic actor, AdamW of the actor alone, reference and reward model.
    policy = _hf_config(tmp_path / "policy", "LlamaForCausalLM", 2, 64)
    rm = _hf_config(tmp_path / "rm", "LlamaForSequenceClassification", 3, 32)
    rc, s, err = run_aot(
        "--topology", "cpu", "--json", "--programs", "experience,update", f"policy={policy}", f"reward_model={rm}",
        "algorithm=grpo", "rollout.group_size=4", "runtime.frozen_param_dtype=bfloat16", "rollout.batch_size=8",
        "rollout.minibatch_size=4", "rollout.max_new_tokens=8", "prompts.max_prompt_tokens=8",
        "prompts.rm_max_length=64", "prompts.eval_prompts=8",
    )  # fmt: skip
    assert rc == 0 and s["algorithm"] == "grpo" and s["fits"] is True, err[-3000:]
    roles, expected = s["roles_bytes"], rl_role_bytes_per_device(policy=(2, 64), rm=(3, 32))
    assert set(roles) == {"actor", "optimizer", "reference", "reward"} and "critic" not in s["models"], roles
    for name in ("actor", "reference", "reward"):
        assert roles[name] == expected[name], (name, roles, expected)
    scalars = 64  # AdamW's count, step, iteration, rng, kl_coef, reward statistics
    assert 2 * expected["actor"] <= roles["optimizer"] <= 2 * expected["actor"] + scalars, roles
    alias = s["programs"]["update"]["memory_bytes"]["alias"]
    assert 3 * expected["actor"] <= alias <= 3 * expected["actor"] + scalars, alias


@pytest.mark.slow  # three train_ppo runs of 3, 2 and 1 iterations in this process
def test_preempt_and_restart_continue_a_grpo_run_exactly_with_no_critic_in_the_checkpoint(
    folders,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
):
    # Uninterrupted: 3 iterations. Interrupted: a SIGTERM during iteration 2 (the run saves step 2 and exits), then a
    # restart to 3: every iteration's rollouts and losses equal the uninterrupted run's bit for bit, so the
    # critic-free state (actor, optimizer, rng, reward statistics) is saved and restored whole. A SIGKILL (no
    # clean-up, a restart from the last periodic checkpoint) goes through the same loop and checkpoints: it is
    # test_train_ppo's SIGTERM/SIGKILL test, whose subprocess this test does not repeat.
    steps = ["algorithm=grpo", "kl.in_loss=true", "rollout.group_size=4", "train.steps=3", "train.save_every=1",
             "train.async_checkpointing=false", "export.hf=false"]  # fmt: skip
    straight = tmp_path / "straight"
    assert train_ppo.main(base_args(folders, straight, *steps)) == 0
    s = summary_of(capsys)
    assert s["status"] == "completed" and s["algorithm"] == "grpo"

    # the checkpoint's own trees (Orbax metadata of the saved state and frozen models): the actor, no critic
    ckpt = straight / "checkpoints" / "3"
    state_tree = ocp.PyTreeCheckpointer().metadata(ckpt / "state").item_metadata
    assert set(state_tree["params"]) == {"actor"}, set(state_tree["params"])
    for part in ("state", "frozen"):
        paths = list(json.loads((ckpt / part / "_METADATA").read_text())["tree_metadata"])
        assert paths and not [p for p in paths if "critic" in p], part

    from starling_jax.rl.job import PPOJob

    original, done = PPOJob.iteration, []

    def sigterm_in_iteration_2(self, *args):  # a real signal, raised inside the run (its handler installed)
        out = original(self, *args)
        done.append(1)
        if len(done) == 2:
            signal.raise_signal(signal.SIGTERM)
        return out

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as m:
        m.setattr(PPOJob, "iteration", sigterm_in_iteration_2)
        assert train_ppo.main(base_args(folders, resumed, *steps)) == 0
    t = summary_of(capsys)
    assert t["status"] == "preempted" and t["steps"] == 2, t
    assert sorted(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
    assert train_ppo.main(base_args(folders, resumed, *steps)) == 0
    r = summary_of(capsys)
    assert r["status"] == "completed" and r["resumed_from"] == 2, r

    def rows(d):
        return {json.loads(x)["step"]: json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()}

    a, b = rows(straight), rows(resumed)
    keys = [k for k in a[3] if k.startswith("rollout/") and k != "rollout/tokens_per_s"] + ["loss", "kl_loss"]
    for step in (1, 2, 3):
        assert {k: b[step][k] for k in keys} == {k: a[step][k] for k in keys}, step
    assert a[2]["rollout/score_raw"] != a[3]["rollout/score_raw"]
    assert (r["reward_start"], r["reward_end"], r["kl_end"]) == (s["reward_start"], s["reward_end"], s["kl_end"])
