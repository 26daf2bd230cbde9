"""The DPO job: K-wise rankings → a `*ForCausalLM` policy tuned against a frozen reference. Run by `train/loop.py`.

Its parts: the trainable `policy` (role `causal_lm`, from `policy`'s HF folder) and, with on-the-fly reference
log-probs, the frozen `reference` (a full copy of the starting policy, or with `num_layers_unfrozen = N` the hydra
copy of its top N layers on the policy's frozen bottom: `model/hydra.py`); the K-wise batch of `train_rm` (same files,
prepared datasets and provenance checks, same layouts and packing) plus each answer's token count
(`dpo_step.dpo_specs`); the step `dpo_step.train_step`; ranking metrics of the implied rewards
β·(log π − log π_ref) on the held-out rankings (also at step 0, where every implied reward is 0); an HF export with
the trained chat format.

With `reference_logps=precompute` the reference's log-probs of every train and eval answer are computed once, by
the starting policy, before training (`precompute_reference`), and read from a host table by input row; no
reference weights are kept or checkpointed. A resumed run recomputes the same table from the same starting weights.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starling_jax.data import pipeline as data_pipeline
from starling_jax.data.batch_spec import round_up
from starling_jax.data.tokenizer import load_tokenizer
from starling_jax.errors import CheckpointError, ConfigError
from starling_jax.eval.metrics import RankingMetrics
from starling_jax.model import create
from starling_jax.model.attention import check_layout
from starling_jax.model.hydra import ReferenceTop
from starling_jax.parallel import sharding
from starling_jax.train import dpo_step, loop
from starling_jax.train.dpo_config import DPORunConfig
from starling_jax.train.job import (
    Job,
    init_model,
    new_figure,
    plot_loss,
    resolve_tokenizer_dir,
    save_figure,
)
from starling_jax.train.optimizer import make_optimizer, trainable_mask
from starling_jax.train.rm_job import build_data, skipped_data_rows
from starling_jax.train.sft_job import export_causal_lm
from starling_jax.train.state import (
    ModelEntry,
    abstract_train_state,
    init_train_state,
    state_shapes,
    state_shardings,
)

log = logging.getLogger("starling_jax")
ROLE = "causal_lm"


class DPOMetrics(RankingMetrics):
    """Ranking metrics of the implied rewards, plus `logratio_rank1`: the mean log π/π_ref of each prompt's
    best-ranked answers (ties included)."""

    def reset(self) -> None:
        super().reset()
        self._logratio_sum, self._logratio_count = 0.0, 0

    def update_logps(self, policy_logps, reference_logps, ranks, answer_mask, answer_lengths, beta: float) -> None:
        logratio = np.asarray(policy_logps, np.float64) - np.asarray(reference_logps, np.float64)
        mask = np.asarray(answer_mask, bool)
        ranks = np.asarray(ranks, np.float64)
        self.update(beta * logratio, ranks, mask, answer_lengths)
        best = np.min(np.where(mask, ranks, np.inf), axis=-1, keepdims=True)
        rank1 = mask & (ranks == best)
        self._logratio_sum += float(np.sum(np.where(rank1, logratio, 0.0)))
        self._logratio_count += int(rank1.sum())

    def compute(self) -> dict:
        out = super().compute()
        out["logratio_rank1"] = self._logratio_sum / self._logratio_count if self._logratio_count else None
        return out


class DPOJob(Job):
    name = "train_dpo"
    window_means = ("loss", "batch_pairwise_accuracy")
    hidden_metrics = ("num_prompts",)

    def __init__(self, cfg: DPORunConfig):
        super().__init__(cfg)
        self.eval_start: dict = {}
        self.skipped_rows: list[dict] = []
        self.reference_tables: dict[str, dict[int, np.ndarray]] = {}

    @property
    def precomputed(self) -> bool:
        return self.cfg.reference_logps == "precompute"

    # --- set-up
    def setup(self, mesh) -> None:
        cfg, d = self.cfg, self.cfg.data
        self.mesh = mesh
        self.tokenizer_dir = resolve_tokenizer_dir(d.tokenizer, cfg.policy, d.template)
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.train_data, self.eval_data = build_data(cfg, self.tokenizer, self.tokenizer_dir, completions=True)
        self.specs = dpo_step.dpo_specs(self.train_data.packed, self.precomputed)
        log.info("data: %d train / %d eval prompts", self.train_data.num_examples, self.eval_data.num_examples)
        self.skipped_rows = skipped_data_rows(self.train_data, self.eval_data)
        if self.skipped_rows:
            log.warning(
                "data: skipped %d bad row(s) (data.on_bad_row=skip), e.g. %s",
                len(self.skipped_rows),
                "; ".join(f"{s['source']} row {s['row']}: {s['reason']}" for s in self.skipped_rows[:3]),
            )

        model_cfg, self.graphdef, params, params_shardings = init_model(
            cfg.model_config, cfg.policy, ROLE, mesh, cfg.seed, self.tokenizer.pad_token_id
        )
        if model_cfg.vocab_size < len(self.tokenizer):
            raise CheckpointError(f"model vocab_size={model_cfg.vocab_size} < tokenizer size {len(self.tokenizer)}")
        check_layout(model_cfg.attention_impl, d.attention_layout, model_cfg.sliding_window, d.max_length)
        self.model_cfg = model_cfg
        n = model_cfg.num_hidden_layers
        if cfg.num_layers_unfrozen > n:
            raise ConfigError(f"num_layers_unfrozen={cfg.num_layers_unfrozen} exceeds the policy's {n} layers")
        self.frozen_layers = 0 if cfg.num_layers_unfrozen == -1 else n - cfg.num_layers_unfrozen
        self.hydra = cfg.num_layers_unfrozen != -1 and not self.precomputed

        # --- the reference: own buffers (the policy's are donated to every update; nnx.clone shares arrays)
        self.models = [ModelEntry("policy", ROLE, model_cfg, trainable=True)]
        self.ref_graphdef = self.graphdef
        if not self.precomputed:
            if self.hydra:
                self.ref_graphdef, ref_params = nnx.split(
                    ReferenceTop(nnx.merge(self.graphdef, params), cfg.num_layers_unfrozen)
                )
            else:
                ref_params = params
            ref_params = jax.tree.map(lambda x: jnp.array(x, copy=True), ref_params)
            self.frozen = {"reference": ref_params}
            self.frozen_shardings = {"reference": jax.tree.map(lambda x: x.sharding, ref_params)}
            self.models.append(ModelEntry("reference", ROLE, model_cfg, trainable=False))

        mask = trainable_mask(params, self.frozen_layers, n) if self.frozen_layers else None
        tx, schedule = make_optimizer(cfg.optim, cfg.train.steps, mask)
        self.state, self.state_shardings = init_train_state(params, params_shardings, tx, mesh, cfg.seed)
        ref_shardings = self.frozen_shardings.get("reference")
        self._step = dpo_step.jit_train_step(
            self.graphdef,
            self.ref_graphdef,
            tx,
            schedule,
            cfg.loss,
            cfg.train.micro_batches,
            mesh,
            self.state_shardings,
            ref_shardings,
            self.specs[0].shardings(mesh),
            grad_mask=None if mask is None else jax.device_put(mask, sharding.replicated(mesh)),
            max_grad_norm=cfg.optim.max_grad_norm,
            frozen_layers=self.frozen_layers,
            hydra=self.hydra,
        )
        self._eval = dpo_step.jit_eval_step(
            self.graphdef, self.ref_graphdef, mesh, self._eval_micro_batches(), self.frozen_layers, self.hydra
        )
        if self.precomputed:
            self.reference_tables = {
                "train": self.precompute_reference(params, self._reference_pass_data()),
                "eval": self.precompute_reference(params, self.eval_data),
            }

    def _eval_micro_batches(self) -> int:
        """As many eval micro-batches as the train step's prompts per micro-batch ask for (as train_rm)."""
        d = self.cfg.data
        if d.attention_layout != "per_answer":  # packed eval rows are not laid out in micro-batch classes
            return 1
        rows = max(d.batch_size // self.cfg.train.micro_batches, 1)
        micro = max(1, d.eval_batch_size // rows)
        while d.eval_batch_size % micro:
            micro -= 1
        return micro

    def _reference_pass_data(self) -> data_pipeline.RankingPipeline:
        """One pass, in eval order, over the train split (for the precomputed reference table)."""
        d, train = self.cfg.data, self.train_data
        return data_pipeline.RankingPipeline(
            train.source,
            global_batch_size=d.eval_batch_size,
            num_answers=d.num_answers,
            max_length=d.max_length,
            pad_to_multiple=d.pad_to_multiple,
            seed=self.cfg.seed,
            mode="eval",
            pad_id=train.pad_id,
            layout=d.layout,
            packing=d.packing,
            completions=True,
        )

    def precompute_reference(self, params, data) -> dict[int, np.ndarray]:
        """{input row: the starting policy's log-probs of its answers [K] (slot order)} over one pass of `data`."""
        table: dict[int, np.ndarray] = {}
        for batch in iter(data):
            zeros = np.zeros(batch["answer_mask"].shape, np.float32)
            out = jax.device_get(self._eval(params, None, self._to_global({**batch, "reference_logps": zeros}, 1)))
            rows = np.asarray(batch["row"])
            if jax.process_count() > 1:  # the outputs are global, the rows this host's
                from jax.experimental import multihost_utils

                rows = np.asarray(multihost_utils.process_allgather(rows, tiled=True))
            for i, r in enumerate(rows):
                if r >= 0:
                    table[int(r)] = np.asarray(out["policy_logps"][i], np.float32)
        data.restore({"epoch": 0, "batch": 0})
        if data is not self.eval_data and hasattr(data, "close"):
            data.close()
        log.info("reference log-probs precomputed for %d prompts", len(table))
        return table

    def _with_reference(self, batch: dict, split: str) -> dict:
        if not self.precomputed:
            return batch
        table = self.reference_tables[split]
        ref = np.zeros(batch["answer_mask"].shape, np.float32)
        for i, r in enumerate(np.asarray(batch["row"])):
            if r >= 0:
                ref[i] = table[int(r)]
        return {**batch, "reference_logps": ref}

    def _to_global(self, batch: dict, which: int) -> dict:
        return data_pipeline.to_global(
            self.specs[which].select(batch), self.mesh, sharding.batch_sharding(self.mesh, 1).spec
        )

    def start(self, state, frozen, meta: dict | None) -> None:
        """The eval metrics before any update (kept in the checkpoint metadata, so a resumed run reports them)."""
        if meta is not None and meta.get("eval_start"):
            self.eval_start = meta["eval_start"]
        else:
            self.eval_start = self.evaluate(state, frozen, self.cfg.train.eval_max_batches)
            log.info("step 0 eval: %s", {k: v for k, v in self.eval_start.items() if not isinstance(v, dict)})

    # --- step, eval
    def train_step(self, state, frozen, host_batch):
        return self._step(state, frozen.get("reference"), self._to_global(self._with_reference(host_batch, "train"), 0))

    def evaluate(self, state, frozen, max_batches: int = 0) -> dict:
        metrics = DPOMetrics()
        for i, batch in enumerate(iter(self.eval_data)):
            if max_batches and i >= max_batches:
                break
            out = jax.device_get(
                self._eval(
                    state["params"], frozen.get("reference"), self._to_global(self._with_reference(batch, "eval"), 1)
                )
            )
            # replicated outputs: every host computes identical metrics over the whole global batch
            metrics.update_logps(
                out["policy_logps"],
                out["reference_logps"],
                out["ranks"],
                out["answer_mask"],
                out["answer_lengths"],
                self.cfg.loss.beta,
            )
        self.eval_data.restore({"epoch": 0, "batch": 0})
        return metrics.compute()

    # --- aot
    def abstract_inputs(self, mesh, model_cfg=None):
        """The train step with precomputed reference log-probs (what `aot` compiles: the policy's own memory; an
        on-the-fly reference adds its parameters and one forward)."""
        if not self.precomputed:
            raise ConfigError("aot of train_dpo compiles the step with reference_logps=precompute; set it")
        model_cfg = model_cfg or self.cfg.model_config
        graphdef, params = create.abstract_model(model_cfg, ROLE)
        frozen_layers = (
            0 if self.cfg.num_layers_unfrozen == -1 else (model_cfg.num_hidden_layers - self.cfg.num_layers_unfrozen)
        )
        mask = trainable_mask(params, frozen_layers, model_cfg.num_hidden_layers) if frozen_layers else None
        tx, schedule = make_optimizer(self.cfg.optim, self.cfg.train.steps, mask)
        shardings = state_shardings(sharding.state_shardings(params, mesh), tx, params, mesh)
        state = abstract_train_state(state_shapes(params, tx), shardings)
        d = self.cfg.data
        train_spec, _ = dpo_step.dpo_specs(d.attention_layout != "per_answer", True)
        dims = {
            "B": d.batch_size,
            "K": d.num_answers,
            "R": d.batch_size * d.num_answers,
            "L": round_up(d.max_length, d.pad_to_multiple),
        }
        step = functools.partial(
            dpo_step.train_step,
            graphdef=graphdef,
            ref_graphdef=graphdef,
            tx=tx,
            schedule=schedule,
            loss_cfg=self.cfg.loss,
            micro_batches=self.cfg.train.micro_batches,
            mesh=mesh,
            grad_mask=mask,
            max_grad_norm=self.cfg.optim.max_grad_norm,
            frozen_layers=frozen_layers,
        )
        jitted = jax.jit(
            lambda state, batch: step(state, None, batch),
            in_shardings=(shardings, train_spec.shardings(mesh)),
            out_shardings=(shardings, sharding.replicated(mesh)),
            donate_argnums=0,
        )
        return state, train_spec.abstract(dims, mesh), jitted

    # --- metadata, export, summary, plot
    def meta(self, last_eval: dict) -> dict:
        return {
            "tokenizer_dir": str(self.tokenizer_dir),
            "template": self.cfg.data.template,
            "max_length": self.cfg.data.max_length,
            "data": self.train_data.source.provenance,
            "policy": self.cfg.policy,
            "eval_start": self.eval_start,
        }

    def export(self, state, frozen, last_eval, folder: Path) -> Path:
        return export_causal_lm(
            folder,
            self.model_cfg,
            state["params"],
            self.tokenizer,
            self.tokenizer_dir,
            self.cfg.data.template,
            extra_config={"starling_jax_data": self.train_data.source.provenance, "dpo_beta": self.cfg.loss.beta},
        )

    def summary(self, last_eval: dict) -> dict:
        return {
            "eval_pairwise_accuracy_start": self.eval_start.get("pairwise_accuracy"),
            "eval_pairwise_accuracy_end": last_eval.get("pairwise_accuracy"),
            "eval_kendall_tau_end": last_eval.get("kendall_tau"),
            "eval_logratio_end": last_eval.get("logratio_rank1"),
        }

    def progress(self, row: dict) -> dict:
        return {"loss": f"{row['loss']:.4f}", "acc": f"{row['batch_pairwise_accuracy']:.3f}"}

    def plot(self, history: list[dict], last_eval: dict, png: Path) -> None:
        fig, (ax1, ax2) = new_figure(2)
        plot_loss(ax1, history, f"DPO {self.cfg.loss.name} loss")
        by_rank = last_eval.get("mean_reward_by_rank") or {}
        ranks = sorted(by_rank, key=float)
        ax2.bar(range(len(ranks)), [by_rank[r] for r in ranks], tick_label=[str(r) for r in ranks])
        ax2.set_xlabel("rank (1 = best)")
        ax2.set_ylabel("mean implied reward β·log π/π_ref")
        ax2.set_title(
            f"eval pairwise acc {self.eval_start.get('pairwise_accuracy') or 0:.3f} → "
            f"{last_eval.get('pairwise_accuracy') or 0:.3f}"
        )
        save_figure(fig, png)


def train_dpo(cfg: DPORunConfig) -> dict[str, Any]:
    return loop.run(DPOJob(cfg))
