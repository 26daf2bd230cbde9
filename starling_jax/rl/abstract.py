"""The RL set with abstract arrays (nothing allocated): every role's parameters and every program one iteration
runs, for `python -m starling_jax.aot` on a PPO/APA/GRPO/RLOO config.

Roles (as `rl/job.py` sets them up):
  state      actor + critic (param_dtype) and one AdamW over both (moments in param_dtype, frozen layers masked
             but still allocated, as optax.masked keeps them), donated to the update; grpo / rloo: the actor
             and its AdamW only (no critic)
  reference  a hydra `ReferenceTop` (num_layers_unfrozen = N: top N layers, final norm, untied LM head) or a full
             frozen copy of the policy, in frozen_param_dtype, outside the state
  reward     the reward model (its own architecture), in frozen_param_dtype, outside the state
Programs (each the very jitted function the run calls, at the run's shapes):
  rollout     the sampler (`sample.engine.make_sampler`): prefill + decode over a [rollout.batch_size,
              max_prompt_tokens + max_new_tokens − 1] KV cache, actor params
  score       the reward model (`score_batches.jit_rewards`) on the re-rendered (rm_max_length) or shared-token batch
  experience  actor / reference / critic forwards + KL, rewards, GAE or group advantages (`PPOJob._experience_fn`)
  update      one donated actor-critic minibatch update (`rl.update.jit_update_step`)
Architectures come from `policy` / `reward_model` as given by the caller (a folder's config.json, the built-in
table of Hub configs): no weights are read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from starling_jax.data.batch_spec import round_up
from starling_jax.eval.score_batches import jit_rewards
from starling_jax.model import create
from starling_jax.model.config import ModelConfig
from starling_jax.model.heads import role_class
from starling_jax.model.hydra import ReferenceTop
from starling_jax.parallel import sharding
from starling_jax.rl.rewards import RewardStats
from starling_jax.rl.update import experience_keys, jit_update_step
from starling_jax.sample.engine import SamplingConfig, make_sampler
from starling_jax.train.optimizer import make_optimizer, trainable_mask

PAD_MULTIPLE = 128  # the reward batch's padding (rl.rerender's pack_sequences default)


@dataclasses.dataclass
class Program:
    name: str
    fn: Any  # jitted
    args: tuple
    donated: Any = None  # the donated argument (aliased by the outputs), or None
    roles: tuple[str, ...] = ()  # the resident roles passed in `args` (the rest stay resident beside it)
    rows: int = 0
    length: int = 0


@dataclasses.dataclass
class AbstractRLSet:
    state: dict  # ShapeDtypeStructs with shardings (donated RL state)
    frozen: dict  # {"reference", "reward"}
    programs: list[Program]
    models: dict[str, ModelConfig]  # actor, critic (ppo / apa only), reward


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _cast(tree, dtype):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)), tree)


def _array(shape, dtype, shard):
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=shard)


def with_runtime(model_cfg: ModelConfig, runtime, frozen: bool) -> ModelConfig:
    return model_cfg.replace(**runtime.model_kwargs(frozen=frozen))


def build(job, mesh, policy_cfg: ModelConfig, rm_cfg: ModelConfig) -> AbstractRLSet:
    """`job`: a `PPOJob` (its config; the attributes its experience program reads are set here). `policy_cfg`,
    `rm_cfg`: the architectures (runtime fields are taken from `runtime`)."""
    cfg = job.cfg
    rt = cfg.runtime
    actor_cfg = with_runtime(policy_cfg, rt, frozen=False)
    rm_cfg = with_runtime(rm_cfg, rt, frozen=True)
    has_critic = job.has_critic
    critic_cfg = with_runtime(rm_cfg if cfg.critic_init == "reward" else policy_cfg, rt, frozen=False)
    n = actor_cfg.num_hidden_layers
    frozen_layers = 0 if cfg.num_layers_unfrozen == -1 else n - cfg.num_layers_unfrozen
    hydra = cfg.num_layers_unfrozen != -1
    rep = sharding.replicated(mesh)

    # --- models (abstract; logical axes → shardings)
    actor_graphdef, actor = create.abstract_model(actor_cfg, "causal_lm")
    critic_graphdef, critic = create.abstract_model(critic_cfg, "reward") if has_critic else (None, None)
    rm_graphdef, rm = create.abstract_model(rm_cfg, "reward")
    if hydra:
        ref_graphdef, ref = nnx.split(
            nnx.eval_shape(
                lambda: ReferenceTop(role_class("causal_lm")(actor_cfg, nnx.Rngs(params=0)), cfg.num_layers_unfrozen)
            )
        )
    else:
        ref_graphdef, ref = actor_graphdef, actor
    shard = lambda tree: sharding.state_shardings(tree, mesh)
    params = {"actor": actor, **({"critic": critic} if has_critic else {})}
    params_shardings = {k: shard(v) for k, v in params.items()}
    frozen = {
        "reference": _abstract(_cast(ref, rt.frozen_param_dtype), shard(ref)),
        "reward": _abstract(_cast(rm, rt.frozen_param_dtype), shard(rm)),
    }

    # --- optimizer and the donated state (init_rl_state's layout)
    critic_frozen = 0 if cfg.critic_layers_unfrozen == -1 else critic_cfg.num_hidden_layers - cfg.critic_layers_unfrozen
    mask = {"actor": trainable_mask(actor, frozen_layers, n)}
    if has_critic:
        mask["critic"] = trainable_mask(critic, critic_frozen, critic_cfg.num_hidden_layers)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps * job.updates_per_step, mask)
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, params_shardings, transform_non_params=lambda _: rep
    )
    scalar = lambda dtype: _array((), dtype, rep)
    state = {
        "step": scalar(jnp.int32),
        "iteration": scalar(jnp.int32),
        "params": _abstract(params, params_shardings),
        "opt_state": _abstract(abstract_opt, opt_shardings),
        "rng": _array(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape, jnp.uint32, rep),
        "kl_coef": scalar(jnp.float32),
        "reward_stats": {k: scalar(jnp.float32) for k in RewardStats._fields},
    }
    state_shardings = jax.tree.map(lambda x: x.sharding, state)

    # --- shapes of one iteration
    r, p = cfg.rollout, cfg.prompts.max_prompt_tokens
    b, t = r.batch_size, r.max_new_tokens
    dp = sharding.data_parallel_size(mesh)
    rows1, rows2 = sharding.batch_sharding(mesh, 1), sharding.batch_sharding(mesh, 2)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    programs = []

    sampling = SamplingConfig(
        max_new_tokens=t,
        temperature=r.temperature,
        top_k=r.top_k,
        top_p=r.top_p,
        eos_token_ids=(actor_cfg.eos_token_id,) if actor_cfg.eos_token_id is not None else (),
        stop_sequences=tuple((0,) * max(1, len(s.split())) for s in r.stop_strings),
        pad_token_id=0,
    )  # stop sequences stand in by length only: no tokenizer is read
    sampler = make_sampler(actor_graphdef, sampling, mesh)
    scorer = jit_rewards(rm_graphdef, mesh)
    job.mesh, job.hydra = mesh, hydra  # what the job's experience program reads
    job.actor_graphdef, job.critic_graphdef, job.ref_graphdef = actor_graphdef, critic_graphdef, ref_graphdef
    job.reward_mean, job.reward_std = 0.0, 1.0  # values only; rm_config normalization reads them from config.json
    experiences = {"": job.jit_experience(r.group_size), "eval_": job.jit_experience(1)}
    rm_len = cfg.prompts.rm_max_length if not cfg.reward_model_shares_tokenizer else p + t
    rm_len = round_up(rm_len, PAD_MULTIPLE)
    # evaluation rolls out all held-out prompts at once (padded to the data-parallel size): more rows than training
    eval_rows = round_up(cfg.prompts.eval_prompts, dp)
    for prefix, rows in (("", b), ("eval_", eval_rows)):
        if prefix and rows == b:
            break  # the same programs as training
        # rollout: the sampler with its KV cache
        programs.append(
            Program(
                f"{prefix}rollout",
                sampler,
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
        programs.append(
            Program(
                f"{prefix}score",
                scorer,
                (frozen["reward"], tok, tok, tok, _array((rm_rows,), jnp.int32, rows1)),
                roles=("reward",),
                rows=rm_rows,
                length=rm_len,
            )
        )
        # experience: the job's own program, on the rollout batch as the run passes it (host arrays → replicated)
        seq = _array((rows, p + t), jnp.int32, rep)
        batch = {"tokens": seq, "positions": seq, "segment_ids": seq, "mask": _array((rows, t), jnp.float32, rep)}
        programs.append(
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
    minibatch = {
        k: _array(
            (mb, p + t) if k in ("tokens", "positions", "segment_ids") else (mb, t),
            jnp.int32 if k in ("tokens", "positions", "segment_ids") else jnp.float32,
            rows2,
        )
        for k in experience_keys(cfg.algorithm)
    }
    update = jit_update_step(
        {"actor": actor_graphdef, **({"critic": critic_graphdef} if has_critic else {})},
        cfg.loss,
        cfg.algorithm,
        tx,
        p,
        mesh,
        state_shardings,
        frozen_layers,
        cfg.kl.in_loss,
    )
    programs.append(
        Program("update", update, (state, minibatch), donated=state, roles=("state",), rows=mb, length=p + t)
    )
    models = {"actor": actor_cfg, **({"critic": critic_cfg} if has_critic else {}), "reward": rm_cfg}
    return AbstractRLSet(state, frozen, programs, models)
