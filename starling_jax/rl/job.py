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

Everything the next iteration depends on — params, optimizer
states, KL coefficient, reward statistics, rng, prompt position — is in the checkpoint, so a resumed run samples
the same rollouts as an uninterrupted one (sampling keys are folded from the seed and the iteration).
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
from starling_jax.data.chat import adds_bos_by_tokenizer, render
from starling_jax.data.prompts import read_prompts
from starling_jax.data.synthetic import resolve_bundled
from starling_jax.data.tokenizer import load_tokenizer
from starling_jax.errors import CheckpointError, ConfigError, DataError
from starling_jax.eval.score_batches import jit_rewards
from starling_jax.model import hf_io
from starling_jax.model.hydra import ReferenceTop
from starling_jax.parallel import sharding
from starling_jax.paths import append_text, as_path
from starling_jax.rl import kl as kl_lib
from starling_jax.rl.config import PPORunConfig
from starling_jax.rl.experience import make_experience, rollout_forward
from starling_jax.rl.losses import CRITIC_FREE
from starling_jax.rl.rerender import check_shared_tokenizer, rm_batch_from_text, rm_batch_from_tokens
from starling_jax.rl.rewards import RewardStats
from starling_jax.rl.stops import Completions, cut_at_stop_strings
from starling_jax.rl.update import init_rl_state, jit_update_step, minibatch_indices
from starling_jax.sample.engine import SamplingConfig, make_sampler, rollout_arrays
from starling_jax.train import loop
from starling_jax.train.job import Job, new_figure, save_figure
from starling_jax.train.optimizer import make_optimizer, trainable_mask
from starling_jax.train.state import ModelEntry

log = logging.getLogger("starling_jax")


class PromptIterator:
    """Batches of prompt row ids in a seeded order, reshuffled every epoch; `state()` / `restore()` give the
    position for exact resume."""

    def __init__(self, rows: list[int], batch_size: int, seed: int):
        self.rows, self.batch_size, self.seed = np.asarray(rows), batch_size, seed
        self.epoch = self.position = 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.rows)

    def __iter__(self):
        while True:
            order = self._order()
            if self.position + self.batch_size > len(order):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            batch = order[self.position : self.position + self.batch_size]
            self.position += self.batch_size
            yield {"row": batch}

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


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
        self.timing = {"generate_s": 0.0, "score_s": 0.0, "update_s": 0.0}
        self._last_tokens = (0, 0, 1)

    # ------------------------------------------------------------------ set-up
    def setup(self, mesh) -> None:
        cfg = self.cfg
        self.mesh = mesh
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

        dp = sharding.data_parallel_size(mesh)  # data × fsdp, × dcn across slices
        if cfg.rollout.minibatch_size % dp:
            raise ConfigError(
                f"rollout.minibatch_size={cfg.rollout.minibatch_size} is not a multiple of the mesh's "
                f"{dp} data-parallel devices"
            )

        # --- models
        rt = cfg.runtime
        actor_cfg, self.actor_graphdef, actor_params = hf_io.load_hf(
            self.policy_dir, "causal_lm", mesh, **rt.model_kwargs(frozen=False)
        )
        self.actor_cfg = actor_cfg
        n = actor_cfg.num_hidden_layers
        self.frozen_layers = 0 if cfg.num_layers_unfrozen == -1 else n - cfg.num_layers_unfrozen
        if self.frozen_layers < 0:
            raise ConfigError(f"num_layers_unfrozen={cfg.num_layers_unfrozen} exceeds the policy's {n} layers")
        if self.has_critic:
            critic_from = self.rm_dir if cfg.critic_init == "reward" else self.policy_dir
            critic_cfg, self.critic_graphdef, critic_params = hf_io.load_hf(
                critic_from, "reward", mesh, init_missing_head=True, seed=cfg.seed, **rt.model_kwargs(frozen=False)
            )
        else:  # grpo / rloo: the group of answers is the baseline
            critic_cfg, self.critic_graphdef, critic_params = None, None, None
        self.rm_cfg, self.rm_graphdef, rm_params = hf_io.load_hf(
            self.rm_dir, "reward", mesh, **rt.model_kwargs(frozen=True)
        )
        rm_json = json.loads((self.rm_dir / "config.json").read_text())
        self.reward_mean, self.reward_std = rm_json.get("reward_mean"), rm_json.get("reward_std")
        if cfg.reward.normalize == "rm_config" and (self.reward_mean is None or not self.reward_std):
            raise ConfigError(
                f"reward.normalize=rm_config but {self.rm_dir / 'config.json'} has no reward_mean / reward_std"
            )
        self.hydra = cfg.num_layers_unfrozen != -1
        if self.hydra:
            ref = ReferenceTop(nnx.merge(self.actor_graphdef, actor_params), cfg.num_layers_unfrozen)
            self.ref_graphdef, ref_params = nnx.split(ref)
        else:
            self.ref_graphdef, ref_params = self.actor_graphdef, actor_params
        # Own buffers: the actor's are donated to every update (nnx.clone shares arrays).
        frozen_dtype = jnp.dtype(rt.frozen_param_dtype)
        ref_params = jax.tree.map(lambda x: jnp.array(x, dtype=frozen_dtype, copy=True), ref_params)
        self.models = [
            ModelEntry("actor", "causal_lm", actor_cfg, True),
            *([ModelEntry("critic", "reward", critic_cfg, True)] if self.has_critic else []),
            ModelEntry("reference", "causal_lm", actor_cfg, False),
            ModelEntry("reward", "reward", self.rm_cfg, False),
        ]
        self.frozen = {"reference": ref_params, "reward": rm_params}
        self.frozen_shardings = {k: jax.tree.map(lambda x: x.sharding, v) for k, v in self.frozen.items()}

        # --- optimizer over the trainable models; frozen layers masked
        params = {"actor": actor_params}
        mask = {"actor": trainable_mask(actor_params, self.frozen_layers, n)}
        if self.has_critic:
            critic_frozen = (
                0 if cfg.critic_layers_unfrozen == -1 else critic_cfg.num_hidden_layers - cfg.critic_layers_unfrozen
            )
            params["critic"] = critic_params
            mask["critic"] = trainable_mask(critic_params, critic_frozen, critic_cfg.num_hidden_layers)
        mask = jax.device_put(mask, sharding.replicated(mesh))
        tx, self.schedule = make_optimizer(cfg.optim, cfg.train.steps * self.updates_per_step, mask)
        params_shardings = jax.tree.map(lambda x: x.sharding, params)
        self.state, self.state_shardings = init_rl_state(params, params_shardings, tx, mesh, cfg.seed, cfg.kl.coef)
        self.graphdefs = {"actor": self.actor_graphdef}
        if self.has_critic:
            self.graphdefs["critic"] = self.critic_graphdef

        # --- prompts, sampling
        convs = read_prompts(resolve_bundled(cfg.prompts.train))
        self.conversations = convs
        order = np.random.default_rng(cfg.seed).permutation(len(convs))
        n_eval = min(cfg.prompts.eval_prompts, len(convs) - self.prompts_per_step)
        if n_eval < 1:
            raise DataError(
                f"{cfg.prompts.train}: {len(convs)} prompts are too few for rollout.batch_size="
                f"{cfg.rollout.batch_size} ({self.prompts_per_step} prompts × group_size {cfg.rollout.group_size}) "
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
        self.train_data = PromptIterator(sorted(order[n_eval:].tolist()), self.prompts_per_step, cfg.seed)
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
        self._sample = make_sampler(self.actor_graphdef, self.sampling, mesh)
        self._rewards = jit_rewards(self.rm_graphdef, mesh)
        self._experience = self.jit_experience(cfg.rollout.group_size)
        self._eval_experience = self.jit_experience(1)
        self._update = jit_update_step(
            self.graphdefs,
            cfg.loss,
            cfg.algorithm,
            tx,
            cfg.prompts.max_prompt_tokens,
            mesh,
            self.state_shardings,
            self.frozen_layers,
            cfg.kl.in_loss,
        )

    @property
    def has_critic(self) -> bool:
        return self.cfg.algorithm not in CRITIC_FREE

    @property
    def prompts_per_step(self) -> int:
        return self.cfg.rollout.batch_size // self.cfg.rollout.group_size

    @property
    def updates_per_step(self) -> int:
        r = self.cfg.rollout
        return r.epochs * (r.batch_size // r.minibatch_size)

    def jit_experience(self, group_size: int):
        """`_experience_fn` jitted for rollout batches of groups of `group_size` answers (1: evaluation, one answer
        per held-out prompt)."""
        return jax.jit(functools.partial(self._experience_fn, group_size=group_size))

    def group_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prompt row ids [P] → (the prompt of each answer [P·G], each answer's sampling seed id [P·G]): prompt g's
        G answers in consecutive rows, answer j seeded by j·N + r (module docstring)."""
        g = self.cfg.rollout.group_size
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
        self, params, rows: np.ndarray, key, seed_ids: np.ndarray | None = None
    ) -> tuple[dict, Any, Completions]:
        """Samples one completion per row (prompt row id; `seed_ids`: each row's sampling seed id, default the row
        id) and cuts it at the stop strings as the authors' trlx does (`rl/stops.py`) → (rollout batch in the
        experience layout, built from the cut completions; sampler output; the completions), all on host."""
        p = self.cfg.prompts.max_prompt_tokens
        b = len(rows)
        pad = self.sampling.pad_token_id
        prompts = np.full((b, p), pad, np.int32)
        lengths = np.zeros((b,), np.int32)
        for i, row in enumerate(rows):
            ids = self.prompt_tokens[row]
            prompts[i, p - len(ids) :] = ids
            lengths[i] = len(ids)
        rows_sharding = sharding.batch_sharding(self.mesh, 1)
        out = self._sample(
            params,
            jax.device_put(prompts, sharding.batch_sharding(self.mesh, 2)),
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
        batch = {k: np.asarray(arrays[k]) for k in ("tokens", "positions", "segment_ids")}
        batch["mask"] = np.asarray(arrays["response_mask"], np.float32)
        return batch, out, completions

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

    def _score(self, rm_params, rows, completions: Completions) -> np.ndarray:
        """Raw RM scores [len(rows)] of the cut completions: their tokens (shared tokenizer; they end at the EOS
        appended after a cut) or their answer text re-rendered in the RM's format (the RM's template closes the
        turn)."""
        n_dev = sharding.data_parallel_size(self.mesh)
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
        scores = self._rewards(
            rm_params, batch["tokens"], batch["positions"], batch["segment_ids"], batch["reward_index"]
        )
        return np.asarray(jax.device_get(scores))[: len(rows)]

    def _experience_fn(self, params, ref_params, rl_stats, kl_coef, batch, raw_scores, ended, *, group_size=1):
        cfg = self.cfg
        with sharding.activation_sharding(self.mesh):
            actor = nnx.merge(self.actor_graphdef, params["actor"])
            critic = nnx.merge(self.critic_graphdef, params["critic"]) if "critic" in params else None
            reference = nnx.merge(self.ref_graphdef, ref_params)
            forward = rollout_forward(actor, reference, critic, batch, cfg.prompts.max_prompt_tokens, self.hydra)
            exp, stats, metrics = make_experience(
                forward,
                batch["mask"],
                raw_scores,
                ended,
                kl_coef,
                RewardStats(**rl_stats),
                kl_cfg=cfg.kl,
                reward_cfg=cfg.reward,
                adv_cfg=cfg.advantage,
                reward_mean=self.reward_mean,
                reward_std=self.reward_std,
                algorithm=cfg.algorithm,
                group_size=group_size,
                kl_in_loss=cfg.kl.in_loss,
            )
        return exp, dict(stats._asdict()), metrics

    def _iteration_key(self, step: int, salt: int):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.cfg.seed), step), salt)

    # ------------------------------------------------------------------ loop hooks
    def start(self, state, frozen, meta: dict | None) -> None:
        if meta is not None and meta.get("eval_start"):
            self.eval_start = meta["eval_start"]
        else:
            self.eval_start = self.evaluate(state, frozen)
            log.info("step 0 eval: %s", self.eval_start)

    def train_step(self, state, frozen, host_batch):
        rows, seed_ids = self.group_rows(np.asarray(host_batch["row"]))
        it = int(jax.device_get(state["iteration"]))
        t0 = time.perf_counter()
        batch, out, completions = self._rollout(state["params"]["actor"], rows, self._iteration_key(it, 0), seed_ids)
        t1 = time.perf_counter()
        raw = self._score(frozen["reward"], rows, completions)
        t2 = time.perf_counter()
        ended = completions.ended
        exp, stats, rollout_metrics = self._experience(
            state["params"],
            frozen["reference"],
            state["reward_stats"],
            state["kl_coef"],
            batch,
            jnp.asarray(raw),
            jnp.asarray(ended),
        )
        state = {**state, "reward_stats": stats}
        exp = {**{k: batch[k] for k in ("tokens", "positions", "segment_ids")}, **exp}
        r = self.cfg.rollout
        order = np.asarray(minibatch_indices(self._iteration_key(it, 1), len(rows), r.minibatch_size, r.epochs))
        exp_host = jax.device_get(exp)
        update_metrics = []
        for epoch in order:
            for idx in epoch:
                state, m = self._update(state, {k: v[idx] for k, v in exp_host.items()})
                update_metrics.append(m)
        kl_coef = kl_lib.update_kl_coef(self.cfg.kl, state["kl_coef"], rollout_metrics["kl"], len(rows))
        rep = sharding.replicated(self.mesh)
        state = {**state, "kl_coef": jax.device_put(kl_coef, rep), "iteration": jax.device_put(jnp.int32(it + 1), rep)}
        t3 = time.perf_counter()
        self.timing = {"generate_s": t1 - t0, "score_s": t2 - t1, "update_s": t3 - t2}
        gen_tokens = int(np.asarray(out.lengths).sum())
        self._last_tokens = (int(batch["segment_ids"].sum()), int(batch["segment_ids"].size), batch["tokens"].shape[1])
        stacked = {k: jnp.stack([m[k] for m in update_metrics]) for k in update_metrics[0]}
        metrics = {k: jnp.mean(v) for k, v in stacked.items() if k != "finite"}
        metrics["finite"] = jnp.all(stacked["finite"])
        metrics.update({f"rollout/{k}": v for k, v in rollout_metrics.items()})
        metrics.update({f"time/{k}": v for k, v in self.timing.items()})
        metrics["rollout/tokens_per_s"] = gen_tokens / max(t1 - t0, 1e-9)
        metrics["rollout/eos_fraction"] = float(ended.mean())
        return state, metrics

    def batch_tokens(self, host_batch):
        return self._last_tokens

    def flops_per_token(self, length: int) -> float:
        return 0.0

    def evaluate(self, state, frozen, max_batches: int = 0) -> dict:
        """Rollouts on the held-out prompts with fixed keys: mean raw RM score, KL to the reference, length."""
        rows = np.asarray(self.eval_rows)
        n_dev = sharding.data_parallel_size(self.mesh)
        padded = np.concatenate([rows, np.repeat(rows[:1], (-len(rows)) % n_dev)])
        batch, _, completions = self._rollout(state["params"]["actor"], padded, jax.random.key(self.cfg.seed + 1))
        raw = self._score(frozen["reward"], padded, completions)
        _, _, m = self._eval_experience(
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

    def abstract_inputs(self, mesh, models: dict | None = None):
        """The update step's (abstract RL state, minibatch, jitted update); the whole RL set (every role, every
        program of an iteration) is left in `self.abstract_set` (`rl/abstract.py`). `models`: {"policy",
        "reward"} architectures; default: from `policy` / `reward_model` (config.json or the built-in table)."""
        from starling_jax.model import architectures
        from starling_jax.rl import abstract

        models = models or {
            "policy": architectures.architecture(self.cfg.policy, "policy"),
            "reward": architectures.architecture(self.cfg.reward_model, "reward_model"),
        }
        self.abstract_set = abstract.build(self, mesh, models["policy"], models["reward"])
        update = next(p for p in self.abstract_set.programs if p.name == "update")
        return update.args[0], update.args[1], update.fn

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
