"""The RL job (PPO, APA, GRPO or RLOO) on the shared trainer: one loop step = one rollout iteration.

    prompts (host batch of row ids) → rollouts (sampler, actor params; G = rollout.group_size answers per prompt)
    → RM scores (re-rendered text or tokens) → experience (rollout forward: actor, reference, critic; KL; rewards;
    GAE, or the group advantage for grpo / rloo) → epochs × minibatches of jitted, donated updates → KL-controller
    update

Models: `actor` and `critic` (trainable, in the donated RL state, `rl/update.py`; grpo / rloo build no critic),
`reference` (a hydra top or a full frozen copy) and `reward` (frozen) outside it.

Groups: a batch of `rollout.batch_size` answers is batch_size / G prompts, each repeated G times in consecutive rows
(b = g·G + j). Answer j of prompt row r samples with the per-row seed id j·N + r (N the prompts in the file), as
`generate --num-samples` does: the G answers are distinct draws, and answer 0 is the draw PPO would make.

On the shared trainer's contract (`train/job.py`): `setup` returns a `JobSetup` (trainable actor and critic, frozen
reference and reward model, the RL state's extra leaves, the prompt iterator), the loop builds the state with the
one builder, and `steps` jits the programs once (`rl/abstract.py::RLPrograms`); every minibatch update is the
trainer's guarded update. Everything the next iteration depends on — params, optimizer states, KL coefficient,
reward statistics, rng, prompt position — is in the checkpoint, so a resumed run samples the same rollouts as an
uninterrupted one (an iteration's sampling and minibatch keys are folded from the state's rng).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starling_jax import hub
from starling_jax.data.batch_spec import ROLLOUT
from starling_jax.data.chat import adds_bos_by_tokenizer, render
from starling_jax.data.prompt_iterator import PromptIterator
from starling_jax.data.prompts import read_prompts
from starling_jax.data.synthetic import resolve_bundled
from starling_jax.data.tokenizer import load_tokenizer
from starling_jax.errors import CheckpointError, ConfigError, DataError
from starling_jax.eval.score_batches import jit_rewards
from starling_jax.model import hf_io
from starling_jax.model.architectures import architecture
from starling_jax.model.hydra import ReferenceTop
from starling_jax.parallel import sharding
from starling_jax.paths import append_text, as_path
from starling_jax.rl import abstract
from starling_jax.rl import kl as kl_lib
from starling_jax.rl.abstract import RLPrograms
from starling_jax.rl.config import PPORunConfig
from starling_jax.rl.losses import CRITIC_FREE
from starling_jax.rl.rerender import check_shared_tokenizer, rm_batch_from_text, rm_batch_from_tokens
from starling_jax.rl.stops import Completions, cut_at_stop_strings
from starling_jax.rl.update import (
    experience_spec,
    jit_experience,
    jit_update_step,
    minibatch_indices,
    rl_extra_state,
)
from starling_jax.sample.engine import SamplingConfig, make_sampler, rollout_arrays
from starling_jax.train import loop
from starling_jax.train.job import Job, JobSetup, Optimizer, Steps, Tokens, batch_tokens, new_figure, save_figure
from starling_jax.train.optimizer import make_optimizer, trainable_mask
from starling_jax.train.state import ModelEntry, abstract_params, is_abstract

log = logging.getLogger("starling_jax")


def _model_folder(ref: str, role: str, key: str) -> Path:
    """`policy` / `reward_model` (a folder, a gs:// URL or a Hub id: `hub.resolve`) → its local folder, which must
    hold a *ForCausalLM (role causal_lm) or a *ForSequenceClassification (role reward)."""
    folder = hub.resolve(ref, key=key)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{key}={ref}: no HF model folder there (config.json missing)")
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    want = "ForCausalLM" if role == "causal_lm" else "ForSequenceClassification"
    if archs and not any(a.endswith(want) for a in archs):
        raise CheckpointError(
            f"{key}={ref}: a {archs[0]} folder, not a *{want} ({'policy' if role == 'causal_lm' else 'reward model'})"
        )
    return folder


class PPOJob(Job):
    name = "train_ppo"
    window_means = ("loss",)
    hidden_metrics = ("finite",)

    def __init__(self, cfg: PPORunConfig):
        super().__init__(cfg)
        self.eval_start: dict = {}

    # ------------------------------------------------------------------ set-up
    def setup(self, mesh) -> JobSetup:
        cfg = self.cfg
        self.policy_dir = _model_folder(cfg.policy, "causal_lm", "policy")
        self.rm_dir = _model_folder(cfg.reward_model, "reward", "reward_model")
        self.tokenizer = load_tokenizer(self.policy_dir)
        self.rm_tokenizer = load_tokenizer(self.rm_dir)
        if cfg.reward_model_shares_tokenizer:
            check_shared_tokenizer(self.tokenizer, self.rm_tokenizer, self.policy_dir, self.rm_dir)
        elif cfg.critic_init == "reward" and self.has_critic:
            raise ConfigError(
                "critic_init=reward needs reward_model_shares_tokenizer=true (the critic reads the "
                "policy's tokens); use critic_init=policy"
            )

        sharding.require_batch_multiple(mesh, {"rollout.minibatch_size": cfg.rollout.minibatch_size})

        # --- models
        rt = cfg.runtime
        actor_cfg, actor_graphdef, actor_params = hf_io.load_hf(
            self.policy_dir, "causal_lm", mesh, **rt.model_kwargs(frozen=False)
        )
        critic = None
        if self.has_critic:
            critic_from = self.rm_dir if cfg.critic_init == "reward" else self.policy_dir
            critic = hf_io.load_hf(
                critic_from, "reward", mesh, init_missing_head=True, seed=cfg.seed, **rt.model_kwargs(frozen=False)
            )
        # else grpo / rloo: the group of answers is the baseline
        rm_cfg, rm_graphdef, rm_params = hf_io.load_hf(self.rm_dir, "reward", mesh, **rt.model_kwargs(frozen=True))
        rm_json = json.loads((self.rm_dir / "config.json").read_text())
        self.reward_mean, self.reward_std = rm_json.get("reward_mean"), rm_json.get("reward_std")
        if cfg.reward.normalize == "rm_config" and (self.reward_mean is None or not self.reward_std):
            raise ConfigError(
                f"reward.normalize=rm_config but {self.rm_dir / 'config.json'} has no reward_mean / reward_std"
            )
        n = actor_cfg.num_hidden_layers
        if cfg.num_layers_unfrozen > n:  # before ReferenceTop would take the layers
            raise ConfigError(f"num_layers_unfrozen={cfg.num_layers_unfrozen} exceeds the policy's {n} layers")
        if cfg.num_layers_unfrozen != -1:  # hydra: the reference is the top layers on the actor's frozen bottom
            ref_graphdef, ref_params = nnx.split(
                ReferenceTop(nnx.merge(actor_graphdef, actor_params), cfg.num_layers_unfrozen)
            )
        else:
            ref_graphdef, ref_params = actor_graphdef, actor_params
        # Own buffers: the actor's are donated to every update (nnx.clone shares arrays).
        frozen_dtype = jnp.dtype(rt.frozen_param_dtype)
        ref_params = jax.tree.map(lambda x: jnp.array(x, dtype=frozen_dtype, copy=True), ref_params)
        placed = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
        setup = self._setup(
            mesh,
            {"actor": actor_cfg, **({"critic": critic[0]} if critic else {}), "reward": rm_cfg},
            {
                "actor": actor_graphdef,
                **({"critic": critic[1]} if critic else {}),
                "reference": ref_graphdef,
                "reward": rm_graphdef,
            },  # fmt: skip
            {"actor": actor_params, **({"critic": critic[2]} if critic else {})},
            {"reference": ref_params, "reward": rm_params},
            placed,
        )

        # --- prompts, sampling
        convs = read_prompts(resolve_bundled(cfg.prompts.train))
        self.conversations = convs
        order = np.random.default_rng(cfg.seed).permutation(len(convs))
        n_eval = min(cfg.prompts.eval_prompts, len(convs) - self.prompts_per_step)
        if n_eval < 1:
            raise DataError(
                f"{cfg.prompts.train}: {len(convs)} prompts are too few for rollout.batch_size="
                f"{cfg.rollout.batch_size} ({self.prompts_per_step} prompts × group_size {cfg.group_size}) "
                "plus held-out prompts"
            )
        self.eval_rows = sorted(order[:n_eval].tolist())
        self.prompt_tokens = [self._encode_prompt(c) for c in convs]
        limit = actor_cfg.max_position_embeddings
        if cfg.prompts.max_prompt_tokens + cfg.rollout.max_new_tokens > limit:
            raise ConfigError(
                f"prompts.max_prompt_tokens={cfg.prompts.max_prompt_tokens} + rollout.max_new_tokens="
                f"{cfg.rollout.max_new_tokens} leave no room within the policy's "
                f"max_position_embeddings={limit}"
            )
        setup.train_data = PromptIterator(sorted(order[n_eval:].tolist()), self.prompts_per_step, cfg.seed)
        from starling_jax.sample.chat import eos_ids, stop_token_sequences

        r = cfg.rollout
        self.sampling = SamplingConfig(
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_k=r.top_k,
            top_p=r.top_p,
            eos_token_ids=eos_ids(self.policy_dir, self.tokenizer, actor_cfg),
            stop_sequences=stop_token_sequences(self.tokenizer, r.stop_strings),
            pad_token_id=self.tokenizer.pad_token_id or 0,
        )
        return setup

    def architectures(self) -> dict:
        """`policy` / `reward_model` architectures (a folder's config.json or the built-in table; no weights)."""
        return {
            "policy": architecture(self.cfg.policy, "policy"),
            "reward": architecture(self.cfg.reward_model, "reward_model"),
        }

    def abstract_setup(self, mesh, architectures: dict) -> JobSetup:
        """Every role abstract (`rl/abstract.py`); sampling stands in for the tokenizer by lengths only."""
        cfg, r = self.cfg, self.cfg.rollout
        models, graphdefs, params, frozen = abstract.models(cfg, architectures["policy"], architectures["reward"])
        self.reward_mean, self.reward_std = 0.0, 1.0  # values only; rm_config normalization reads config.json
        actor_cfg = models["actor"]
        self.sampling = SamplingConfig(
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_k=r.top_k,
            top_p=r.top_p,
            eos_token_ids=(actor_cfg.eos_token_id,) if actor_cfg.eos_token_id is not None else (),
            stop_sequences=tuple((0,) * max(1, len(s.split())) for s in r.stop_strings),
            pad_token_id=0,
        )  # stop sequences stand in by length only: no tokenizer is read
        return self._setup(mesh, models, graphdefs, params, frozen, lambda tree: sharding.state_shardings(tree, mesh))

    def _setup(self, mesh, models: dict, graphdefs: dict, params: dict, frozen: dict, shardings_of) -> JobSetup:
        """The set-up of concrete or abstract models: `models` (actor, critic if any, reward: configs), their
        graphdefs (and the reference's), trainable `params`, `frozen` (reference, reward); `shardings_of`: a
        tree's shardings (placed arrays: theirs; abstract: by the rules table)."""
        cfg = self.cfg
        actor_cfg = models["actor"]
        n = actor_cfg.num_hidden_layers
        self.actor_cfg = actor_cfg
        self.frozen_layers = 0 if cfg.num_layers_unfrozen == -1 else n - cfg.num_layers_unfrozen
        if self.frozen_layers < 0:
            raise ConfigError(f"num_layers_unfrozen={cfg.num_layers_unfrozen} exceeds the policy's {n} layers")
        self.hydra = cfg.num_layers_unfrozen != -1
        self.models = [
            ModelEntry("actor", "causal_lm", actor_cfg, True),
            *([ModelEntry("critic", "reward", models["critic"], True)] if "critic" in params else []),
            ModelEntry("reference", "causal_lm", actor_cfg, False),
            ModelEntry("reward", "reward", models["reward"], False),
        ]
        # --- one optimizer over the trainable models; frozen layers masked
        mask = {"actor": trainable_mask(params["actor"], self.frozen_layers, n)}
        if "critic" in params:
            critic_cfg = models["critic"]
            critic_frozen = (
                0 if cfg.critic_layers_unfrozen == -1 else critic_cfg.num_hidden_layers - cfg.critic_layers_unfrozen
            )
            mask["critic"] = trainable_mask(params["critic"], critic_frozen, critic_cfg.num_hidden_layers)
        tx, schedule = make_optimizer(cfg.optim, cfg.train.steps * self.updates_per_step, mask)
        if not is_abstract(params):
            mask = jax.device_put(mask, sharding.replicated(mesh))
        frozen_shardings = {k: shardings_of(v) for k, v in frozen.items()}
        if is_abstract(params):
            frozen = {k: abstract_params(v, frozen_shardings[k]) for k, v in frozen.items()}
        return JobSetup(
            models=self.models,
            graphdefs=graphdefs,
            params=params,
            params_shardings=shardings_of(params),
            optimizer=Optimizer(tx, schedule, mask),
            frozen=frozen,
            frozen_shardings=frozen_shardings,
            extra_state=rl_extra_state(cfg.kl.coef),
        )

    @property
    def has_critic(self) -> bool:
        return self.cfg.algorithm not in CRITIC_FREE

    @property
    def prompts_per_step(self) -> int:
        return self.cfg.rollout.batch_size // self.cfg.group_size

    @property
    def updates_per_step(self) -> int:
        r = self.cfg.rollout
        return r.epochs * (r.batch_size // r.minibatch_size)

    def group_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prompt row ids [P] → (the prompt of each answer [P·G], each answer's sampling seed id [P·G]): prompt g's
        G answers in consecutive rows, answer j seeded by j·N + r (module docstring)."""
        g = self.cfg.group_size
        answer_rows = np.repeat(np.asarray(rows), g)
        seed_ids = np.tile(np.arange(g), len(rows)) * len(self.conversations) + answer_rows
        return answer_rows, seed_ids

    def _encode_prompt(self, messages) -> list[int]:
        template = self.cfg.prompts.template
        text = render(self.tokenizer, messages, template)
        ids = list(self.tokenizer(text, add_special_tokens=adds_bos_by_tokenizer(template))["input_ids"])
        return ids[-self.cfg.prompts.max_prompt_tokens :]  # Starling cuts prompts from the left

    # ------------------------------------------------------------------ rollouts
    def _rollout(
        self, sample, mesh, params, rows: np.ndarray, key, seed_ids: np.ndarray | None = None
    ) -> tuple[dict, Any, Completions]:
        """Samples with `sample` (the jitted sampler) one completion per row (prompt row id; `seed_ids`: each
        row's sampling seed id, default the row id) and cuts it at the stop strings as the authors' trlx does
        (`rl/stops.py`) → (`ROLLOUT` batch built from the cut completions; sampler output; the completions), all
        on host."""
        p = self.cfg.prompts.max_prompt_tokens
        b = len(rows)
        pad = self.sampling.pad_token_id
        prompts = np.full((b, p), pad, np.int32)
        lengths = np.zeros((b,), np.int32)
        for i, row in enumerate(rows):
            ids = self.prompt_tokens[row]
            prompts[i, p - len(ids) :] = ids
            lengths[i] = len(ids)
        rows_sharding = sharding.batch_sharding(mesh, 1)
        out = sample(
            params,
            jax.device_put(prompts, sharding.batch_sharding(mesh, 2)),
            jax.device_put(lengths, rows_sharding),
            jax.device_put(np.asarray(rows if seed_ids is None else seed_ids, np.int32), rows_sharding),
            key,
        )
        out = jax.device_get(out)
        stops = self.cfg.rollout.stop_strings
        completions = cut_at_stop_strings(
            self.tokenizer, out.tokens, out.lengths, out.finish_reason, stops, self._eos_id() if stops else -1, pad
        )
        arrays = jax.device_get(
            rollout_arrays(prompts, lengths, out._replace(tokens=completions.tokens, lengths=completions.lengths))
        )
        batch = {**arrays, "mask": np.asarray(arrays["response_mask"], np.float32)}
        return {k: np.asarray(v) for k, v in ROLLOUT.select(batch).items()}, out, completions

    def _eos_id(self) -> int:
        """The EOS appended to a completion cut at a stop string (trlx: `tokenizer.eos_token`)."""
        eos = self.tokenizer.eos_token_id
        if eos is None and self.sampling.eos_token_ids:
            eos = self.sampling.eos_token_ids[0]
        if eos is None:
            raise ConfigError(
                f"policy={self.cfg.policy}: its tokenizer has no EOS token to end a completion cut at "
                "rollout.stop_strings"
            )
        return int(eos)

    def _score(self, rewards, mesh, rm_params, rows, completions: Completions) -> np.ndarray:
        """Raw RM scores [len(rows)] of the cut completions: their tokens (shared tokenizer; they end at the EOS
        appended after a cut) or their answer text re-rendered in the RM's format (the RM's template closes the
        turn). `rewards`: the jitted reward-model program."""
        n_dev = sharding.data_parallel_size(mesh)
        num_rows = -(-len(rows) // n_dev) * n_dev
        if self.cfg.reward_model_shares_tokenizer:
            generated = [completions.tokens[i, : completions.lengths[i]].tolist() for i in range(len(rows))]
            batch = rm_batch_from_tokens(
                [self.prompt_tokens[r] for r in rows], generated, self.rm_tokenizer.pad_token_id or 0, num_rows=num_rows
            )
        else:
            batch, _ = rm_batch_from_text(
                self.rm_tokenizer,
                self.cfg.prompts.rm_template,
                [self.conversations[r] for r in rows],
                completions.texts,
                self.cfg.prompts.rm_max_length,
                num_rows=num_rows,
            )
        scores = rewards(rm_params, batch["tokens"], batch["positions"], batch["segment_ids"], batch["reward_index"])
        return np.asarray(jax.device_get(scores))[: len(rows)]

    # ------------------------------------------------------------------ the programs, an iteration, eval
    def steps(self, mesh, setup: JobSetup, state) -> Steps:
        """The sampler, the reward model, the experience (training groups; eval: one answer per prompt) and the
        donated update, jitted once; `train` is one rollout iteration over them (`iteration`)."""
        cfg, opt, gd = self.cfg, setup.optimizer, setup.graphdefs
        trainable = {name: gd[name] for name in setup.params_shardings}  # actor, critic if any
        common = dict(
            graphdefs={**trainable, "reference": gd["reference"]},
            hydra=self.hydra,
            cfg=cfg,
            reward_mean=self.reward_mean,
            reward_std=self.reward_std,
            mesh=mesh,
        )
        programs = RLPrograms(
            sample=make_sampler(gd["actor"], self.sampling, mesh),
            rewards=jit_rewards(gd["reward"], mesh),
            experience=jit_experience(group_size=cfg.group_size, **common),
            eval_experience=jit_experience(group_size=1, **common),
            update=jit_update_step(
                trainable,
                cfg.loss,
                cfg.algorithm,
                opt.tx,
                opt.schedule,
                cfg.prompts.max_prompt_tokens,
                mesh,
                jax.tree.map(lambda x: x.sharding, state),
                self.frozen_layers,
                cfg.kl.in_loss,
                grad_mask=opt.mask,
                max_grad_norm=cfg.optim.max_grad_norm,
            ),
        )
        frozen = {k: abstract_params(v, setup.frozen_shardings[k]) for k, v in setup.frozen.items()}
        return Steps(
            train=functools.partial(self.iteration, programs, mesh),
            evaluate=functools.partial(self.evaluate, programs, mesh),
            programs=abstract.programs(cfg, mesh, state, frozen, programs, has_critic=self.has_critic),
        )

    def iteration(self, programs: RLPrograms, mesh, state, frozen, host_batch) -> tuple[dict, dict, Tokens]:
        """One rollout iteration: rollouts → RM scores → experience → epochs × minibatches of `programs.update`
        (each the trainer's guarded update) → KL-controller update. The sampling and minibatch-order keys are
        folded from the state's rng (checkpointed: a resumed run samples what an uninterrupted one does)."""
        rows, seed_ids = self.group_rows(np.asarray(host_batch["row"]))
        it = int(jax.device_get(state["iteration"]))
        key = jax.random.wrap_key_data(state["rng"])
        t0 = time.perf_counter()
        batch, out, completions = self._rollout(
            programs.sample, mesh, state["params"]["actor"], rows, jax.random.fold_in(key, 0), seed_ids
        )
        t1 = time.perf_counter()
        raw = self._score(programs.rewards, mesh, frozen["reward"], rows, completions)
        t2 = time.perf_counter()
        ended = completions.ended
        exp, stats, rollout_metrics = programs.experience(
            state["params"],
            frozen["reference"],
            state["reward_stats"],
            state["kl_coef"],
            batch,
            jnp.asarray(raw),
            jnp.asarray(ended),
        )
        state = {**state, "reward_stats": stats}
        spec = experience_spec(self.cfg.algorithm)
        exp_host = jax.device_get(spec.select({**batch, **exp}))
        r = self.cfg.rollout
        order = np.asarray(minibatch_indices(jax.random.fold_in(key, 1), len(rows), r.minibatch_size, r.epochs))
        update_metrics = []
        for epoch in order:
            for idx in epoch:
                state, m = programs.update(state, {k: v[idx] for k, v in exp_host.items()})
                update_metrics.append(m)
        kl_coef = kl_lib.update_kl_coef(self.cfg.kl, state["kl_coef"], rollout_metrics["kl"], len(rows))
        rep = sharding.replicated(mesh)
        state = {**state, "kl_coef": jax.device_put(kl_coef, rep), "iteration": jax.device_put(jnp.int32(it + 1), rep)}
        # the updates are dispatched asynchronously: wait for them, else their device time lands outside every
        # timer (or in the next iteration's generate_s, whose sampler waits for the new actor params)
        jax.block_until_ready(state)
        t3 = time.perf_counter()
        gen_tokens = int(np.asarray(out.lengths).sum())
        stacked = {k: jnp.stack([m[k] for m in update_metrics]) for k in update_metrics[0]}
        metrics = {k: jnp.mean(v) for k, v in stacked.items() if k != "finite"}
        metrics["finite"] = jnp.all(stacked["finite"])
        metrics.update({f"rollout/{k}": v for k, v in rollout_metrics.items()})
        metrics.update({"time/generate_s": t1 - t0, "time/score_s": t2 - t1, "time/update_s": t3 - t2})
        metrics["rollout/tokens_per_s"] = gen_tokens / max(t1 - t0, 1e-9)
        metrics["rollout/eos_fraction"] = float(ended.mean())
        return state, metrics, batch_tokens(batch)

    def start(self, state, frozen, meta: dict | None, steps: Steps) -> None:
        if meta is not None and meta.get("eval_start"):
            self.eval_start = meta["eval_start"]
        else:
            self.eval_start = steps.evaluate(state, frozen)
            log.info("step 0 eval: %s", self.eval_start)

    def flops_per_token(self, length: int) -> float:
        return 0.0

    def evaluate(self, programs: RLPrograms, mesh, state, frozen, max_batches: int = 0) -> dict:
        """Rollouts on the held-out prompts with fixed keys: mean raw RM score, KL to the reference, length."""
        rows = np.asarray(self.eval_rows)
        n_dev = sharding.data_parallel_size(mesh)
        padded = np.concatenate([rows, np.repeat(rows[:1], (-len(rows)) % n_dev)])
        batch, _, completions = self._rollout(
            programs.sample, mesh, state["params"]["actor"], padded, jax.random.key(self.cfg.seed + 1)
        )
        raw = self._score(programs.rewards, mesh, frozen["reward"], padded, completions)
        _, _, m = programs.eval_experience(
            state["params"],
            frozen["reference"],
            state["reward_stats"],
            state["kl_coef"],
            batch,
            jnp.asarray(raw),
            jnp.asarray(completions.ended),
        )
        m = jax.device_get(m)
        n = len(rows)
        samples = [
            {
                "prompt": self.conversations[r][-1]["content"][:200],
                "completion": completions.texts[i],
                "reward": float(raw[i]),
            }
            for i, r in enumerate(rows[:4])
        ]
        if jax.process_index() == 0:  # a table of sample completions per evaluation (output_dir may be a URL)
            append_text(
                as_path(self.cfg.output_dir) / "samples.jsonl",
                json.dumps({"iteration": int(jax.device_get(state["iteration"])), "samples": samples}) + "\n",
            )
        return {"reward": float(np.mean(raw[:n])), "kl": float(m["kl"]), "response_length": float(m["response_length"])}

    def meta(self, last_eval: dict) -> dict:
        return {
            "eval_start": self.eval_start,
            "policy": str(self.policy_dir),
            "reward_model": str(self.rm_dir),
            "algorithm": self.cfg.algorithm,
        }

    def export(self, state, frozen, last_eval, folder: Path) -> Path:
        """The actor as a HF folder (a local path or a URL: `save_hf` writes it aside, then renames or uploads it)
        with the policy's tokenizer files and generation config."""
        generation = self.policy_dir / "generation_config.json"
        return hf_io.save_hf(
            folder,
            self.actor_cfg,
            state["params"]["actor"],
            "causal_lm",
            tokenizer_dir=self.policy_dir,
            extra_files=[generation] if generation.is_file() else [],
        )

    def summary(self, last_eval: dict) -> dict:
        return {
            "algorithm": self.cfg.algorithm,
            "reward_start": self.eval_start.get("reward"),
            "reward_end": last_eval.get("reward"),
            "kl_end": last_eval.get("kl"),
            "response_length_end": last_eval.get("response_length"),
        }

    def progress(self, row: dict) -> dict:
        return {
            "score": f"{row.get('rollout/score_raw', float('nan')):.3f}",
            "kl": f"{row.get('rollout/kl', float('nan')):.3f}",
        }

    def plot(self, history: list[dict], last_eval: dict, png: Path) -> None:
        fig, (ax1, ax2) = new_figure(2)
        steps = [r["step"] for r in history]
        ax1.plot(steps, [r.get("rollout/score_raw") for r in history])
        ax1.set_xlabel("iteration")
        ax1.set_ylabel("mean RM score of rollouts")
        ax1.set_title(
            f"{self.cfg.algorithm}: held-out reward {self.eval_start.get('reward', float('nan')):.3f} → "
            f"{last_eval.get('reward', float('nan')):.3f}"
        )
        ax2.plot(steps, [r.get("rollout/kl") for r in history])
        ax2.set_xlabel("iteration")
        ax2.set_ylabel("KL(π‖π_ref) per sequence")
        save_figure(fig, png)


def train_ppo(cfg: PPORunConfig) -> dict[str, Any]:
    return loop.run(PPOJob(cfg))
