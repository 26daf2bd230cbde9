"""The RL roles and programs with abstract arrays (nothing allocated): what `PPOJob.abstract_setup` and
`PPOJob.steps` give `python -m starling_jax.aot` on a PPO/APA/GRPO/RLOO config (`aot.abstract_programs`, the
question it asks every job).

Roles (as `rl/job.py` sets them up):
  state      actor + critic (param_dtype) and one AdamW over both (moments in param_dtype, frozen layers masked
             but still allocated, as optax.masked keeps them), donated to the update; grpo / rloo: the actor
             and its AdamW only (no critic). Built by the trainer's one builder (`train.state.build_train_state`).
  reference  a hydra `ReferenceTop` (num_layers_unfrozen = N: top N layers, final norm, untied LM head) or a full
             frozen copy of the policy, in frozen_param_dtype, outside the state
  reward     the reward model (its own architecture), in frozen_param_dtype, outside the state
Programs (each the very jitted function the run calls, at the run's shapes; `RLPrograms`):
  rollout     the sampler (`sample.engine.make_sampler`): prefill + decode over a [rollout.batch_size,
              max_prompt_tokens + max_new_tokens − 1] KV cache, actor params
  score       the reward model (`score_batches.jit_rewards`) on the re-rendered (rm_max_length) or shared-token batch
  experience  actor / reference / critic forwards + KL, rewards, GAE or group advantages (`update.experience_step`)
  update      one donated minibatch update (`update.jit_update_step`, through `train.step.apply_update`)
Architectures come from `policy` / `reward_model` as given by the caller (a folder's config.json, the built-in
table of Hub configs): no weights are read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from starling_jax.data.batch_spec import ROLLOUT, round_up
from starling_jax.model import create
from starling_jax.model.config import ModelConfig
from starling_jax.model.heads import role_class
from starling_jax.model.hydra import ReferenceTop
from starling_jax.parallel import sharding
from starling_jax.rl.losses import CRITIC_FREE
from starling_jax.rl.update import experience_spec
from starling_jax.train.job import Program
from starling_jax.train.state import build_train_state

PAD_MULTIPLE = 128  # the reward batch's padding (rl.rerender's pack_sequences default)


@dataclasses.dataclass
class RLPrograms:
    """The jitted programs of an RL run, built once (`PPOJob.steps`)."""

    sample: Any  # (actor params, prompts, lengths, seed ids, key) → SampleOutput
    rewards: Any  # (rm params, tokens, positions, segment_ids, reward_index) → scores
    experience: Any  # (params, reference, reward stats, kl_coef, ROLLOUT batch, raw scores, ended) → ...
    eval_experience: Any  # the same for one answer per held-out prompt
    update: Any  # (state, experience minibatch) → (state, metrics)


@dataclasses.dataclass
class AbstractRLSet:
    state: dict  # ShapeDtypeStructs with shardings (donated RL state)
    frozen: dict  # {"reference", "reward"}
    programs: list[Program]
    models: dict[str, ModelConfig]  # actor, critic (ppo / apa only), reward


def _cast(tree, dtype):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)), tree)


def _array(shape, dtype, shard):
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=shard)


def with_runtime(model_cfg: ModelConfig, runtime, frozen: bool) -> ModelConfig:
    return model_cfg.replace(**runtime.model_kwargs(frozen=frozen))


def models(cfg, policy_cfg: ModelConfig, rm_cfg: ModelConfig) -> tuple[dict, dict, dict, dict]:
    """Every role abstract → (configs {actor, critic?, reward}, graphdefs {actor, critic?, reference, reward},
    trainable params {actor, critic?}, frozen params {reference, reward} in frozen_param_dtype). `cfg`: a
    `PPORunConfig`; the architectures' runtime fields are taken from its `runtime`."""
    rt = cfg.runtime
    actor_cfg = with_runtime(policy_cfg, rt, frozen=False)
    reward_cfg = with_runtime(rm_cfg, rt, frozen=True)
    has_critic = cfg.algorithm not in CRITIC_FREE
    configs = {"actor": actor_cfg}
    actor_graphdef, actor = create.abstract_model(actor_cfg, "causal_lm")
    graphdefs, params = {"actor": actor_graphdef}, {"actor": actor}
    if has_critic:
        configs["critic"] = with_runtime(rm_cfg if cfg.critic_init == "reward" else policy_cfg, rt, frozen=False)
        graphdefs["critic"], params["critic"] = create.abstract_model(configs["critic"], "reward")
    configs["reward"] = reward_cfg
    rm_graphdef, rm = create.abstract_model(reward_cfg, "reward")
    if cfg.num_layers_unfrozen != -1:
        ref_graphdef, ref = nnx.split(
            nnx.eval_shape(
                lambda: ReferenceTop(role_class("causal_lm")(actor_cfg, nnx.Rngs(params=0)), cfg.num_layers_unfrozen)
            )
        )
    else:
        ref_graphdef, ref = actor_graphdef, actor
    graphdefs.update(reference=ref_graphdef, reward=rm_graphdef)
    frozen = {"reference": _cast(ref, rt.frozen_param_dtype), "reward": _cast(rm, rt.frozen_param_dtype)}
    return configs, graphdefs, params, frozen


def programs(cfg, mesh, state: dict, frozen: dict, fns: RLPrograms, has_critic: bool) -> list[Program]:
    """The programs of one iteration (and of evaluation, when its batch differs) with abstract arguments at the
    run's shapes. `state`, `frozen`: abstract, with shardings."""
    r, p = cfg.rollout, cfg.prompts.max_prompt_tokens
    b, t = r.batch_size, r.max_new_tokens
    dp = sharding.data_parallel_size(mesh)
    rep = sharding.replicated(mesh)
    rows1, rows2 = sharding.batch_sharding(mesh, 1), sharding.batch_sharding(mesh, 2)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    rm_len = cfg.prompts.rm_max_length if not cfg.reward_model_shares_tokenizer else p + t
    rm_len = round_up(rm_len, PAD_MULTIPLE)
    out = []
    # evaluation rolls out all held-out prompts at once (padded to the data-parallel size): more rows than training
    eval_rows = round_up(cfg.prompts.eval_prompts, dp)
    experiences = {"": fns.experience, "eval_": fns.eval_experience}
    for prefix, rows in (("", b), ("eval_", eval_rows)):
        if prefix and rows == b:
            break  # the same programs as training
        # rollout: the sampler with its KV cache
        out.append(
            Program(
                f"{prefix}rollout",
                fns.sample,
                (
                    state["params"]["actor"],
                    _array((rows, p), jnp.int32, rows2),
                    _array((rows,), jnp.int32, rows1),
                    _array((rows,), jnp.int32, rows1),
                    key,
                ),
                roles=("actor",),
                rows=rows,
                length=p + t,
            )
        )
        # score: the reward model on the longest batch it can get, rows padded to the data-parallel size
        rm_rows = round_up(rows, dp)
        tok = _array((rm_rows, rm_len), jnp.int32, rows2)
        out.append(
            Program(
                f"{prefix}score",
                fns.rewards,
                (frozen["reward"], tok, tok, tok, _array((rm_rows,), jnp.int32, rows1)),
                roles=("reward",),
                rows=rm_rows,
                length=rm_len,
            )
        )
        # experience: on the ROLLOUT batch as the run passes it (host arrays → replicated)
        batch = {
            k: _array(shape, ROLLOUT.field(k).dtype, rep)
            for k, shape in ROLLOUT.shapes({"B": rows, "S": p + t, "T": t}).items()
        }
        out.append(
            Program(
                f"{prefix}experience",
                experiences[prefix],
                (
                    state["params"],
                    frozen["reference"],
                    state["reward_stats"],
                    state["kl_coef"],
                    batch,
                    _array((rows,), jnp.float32, rep),
                    _array((rows,), jnp.bool_, rep),
                ),
                roles=("actor", "critic", "reference") if has_critic else ("actor", "reference"),
                rows=rows,
                length=p + t,
            )
        )
    # update: one donated minibatch step
    mb = r.minibatch_size
    minibatch = experience_spec(cfg.algorithm).abstract({"B": mb, "S": p + t, "T": t}, mesh)
    update = Program("update", fns.update, (state, minibatch), donated=state, roles=("state",), rows=mb, length=p + t)
    return [*out, update]


def build(job, mesh, policy_cfg: ModelConfig, rm_cfg: ModelConfig) -> AbstractRLSet:
    """`job` (a `PPOJob`)'s abstract set-up, state and programs for these architectures: what `aot` asks of it
    (`aot.abstract_programs`), gathered."""
    setup = job.abstract_setup(mesh, {"policy": policy_cfg, "reward": rm_cfg})
    state, _ = build_train_state(
        setup.params, setup.params_shardings, setup.optimizer.tx, mesh, extra=setup.extra_state
    )
    steps = job.steps(mesh, setup, state)
    configs = {m.name: m.config for m in setup.models if m.name != "reference"}
    return AbstractRLSet(state, setup.frozen, steps.programs, configs)
