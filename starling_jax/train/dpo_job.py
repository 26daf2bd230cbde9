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
    JobSetup,
    Optimizer,
    Program,
    Steps,
    batch_tokens,
    init_model,
    new_figure,
    plot_loss,
    resolve_tokenizer_dir,
    run_architecture,
    save_figure,
)
from starling_jax.train.optimizer import make_optimizer, trainable_mask
from starling_jax.train.rm_job import build_data, skipped_data_rows
from starling_jax.train.sft_job import export_causal_lm
from starling_jax.train.state import ModelEntry, abstract_params, is_abstract

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
    def setup(self, mesh) -> JobSetup:
        cfg, d = self.cfg, self.cfg.data
        self.tokenizer_dir = resolve_tokenizer_dir(d.tokenizer, cfg.policy, d.template)
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.row_multiple = sharding.packed_row_multiple(mesh)
        self.train_data, self.eval_data = build_data(
            cfg, self.tokenizer, self.tokenizer_dir, completions=True, row_multiple=self.row_multiple
        )
        log.info("data: %d train / %d eval prompts", self.train_data.num_examples, self.eval_data.num_examples)
        self.skipped_rows = skipped_data_rows(self.train_data, self.eval_data)
        if self.skipped_rows:
            log.warning(
                "data: skipped %d bad row(s) (data.on_bad_row=skip), e.g. %s",
                len(self.skipped_rows),
                "; ".join(f"{s['source']} row {s['row']}: {s['reason']}" for s in self.skipped_rows[:3]),
            )

        # the batch axis of every device array is split over the data-parallel devices
        sharding.require_batch_multiple(
            mesh, {"data.batch_size": d.batch_size, "data.eval_batch_size": d.eval_batch_size}
        )
        model_cfg, graphdef, params, params_shardings = init_model(
            cfg.model_config, cfg.policy, ROLE, mesh, cfg.seed, self.tokenizer.pad_token_id
        )
        if model_cfg.vocab_size < len(self.tokenizer):
            raise CheckpointError(f"model vocab_size={model_cfg.vocab_size} < tokenizer size {len(self.tokenizer)}")
        check_layout(model_cfg.attention_impl, d.attention_layout, model_cfg.sliding_window, d.max_length)
        setup = self._setup(mesh, model_cfg, graphdef, params, params_shardings)
        setup.train_data, setup.eval_data = self.train_data, self.eval_data

        # --- the reference: own buffers (the policy's are donated to every update; nnx.clone shares arrays)
        if not self.precomputed:
            if self.hydra:
                ref_graphdef, ref_params = nnx.split(ReferenceTop(nnx.merge(graphdef, params), cfg.num_layers_unfrozen))
                setup.graphdefs["reference"] = ref_graphdef
            ref_params = jax.tree.map(lambda x: jnp.array(x, copy=True), ref_params if self.hydra else params)
            setup.frozen = {"reference": ref_params}
            setup.frozen_shardings = {"reference": jax.tree.map(lambda x: x.sharding, ref_params)}
            setup.models.append(ModelEntry("reference", ROLE, model_cfg, trainable=False))
        return setup

    def architectures(self) -> dict:
        return {"policy": run_architecture(self.cfg.model_config, self.cfg.policy)}

    def abstract_setup(self, mesh, architectures: dict) -> JobSetup:
        """The policy alone, with precomputed reference log-probs (what `aot` compiles: the policy's own memory; an
        on-the-fly reference adds its parameters and one forward)."""
        if not self.precomputed:
            raise ConfigError("aot of train_dpo compiles the step with reference_logps=precompute; set it")
        model_cfg = architectures["policy"]
        graphdef, params = create.abstract_model(model_cfg, ROLE)
        return self._setup(mesh, model_cfg, graphdef, params, sharding.state_shardings(params, mesh))

    def _setup(self, mesh, model_cfg, graphdef, params, params_shardings) -> JobSetup:
        cfg = self.cfg
        n = model_cfg.num_hidden_layers
        if cfg.num_layers_unfrozen > n:
            raise ConfigError(f"num_layers_unfrozen={cfg.num_layers_unfrozen} exceeds the policy's {n} layers")
        self.model_cfg = model_cfg
        self.frozen_layers = 0 if cfg.num_layers_unfrozen == -1 else n - cfg.num_layers_unfrozen
        self.models = [ModelEntry("policy", ROLE, model_cfg, trainable=True)]
        mask = trainable_mask(params, self.frozen_layers, n) if self.frozen_layers else None
        tx, schedule = make_optimizer(cfg.optim, cfg.train.steps, mask)
        if mask is not None and not is_abstract(params):
            mask = jax.device_put(mask, sharding.replicated(mesh))
        return JobSetup(
            models=self.models,
            graphdefs={"policy": graphdef, "reference": graphdef},
            params=params,
            params_shardings=params_shardings,
            optimizer=Optimizer(tx, schedule, mask),
        )

    @property
    def hydra(self) -> bool:
        return self.cfg.num_layers_unfrozen != -1 and not self.precomputed

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
            loader=d.loader,
            row_multiple=self.row_multiple,
        )

    def precompute_reference(self, eval_fn, to_global, params, data) -> dict[int, np.ndarray]:
        """{input row: the starting policy's log-probs of its answers [K] (slot order)} over one pass of `data`."""
        table: dict[int, np.ndarray] = {}
        for batch in iter(data):
            zeros = np.zeros(batch["answer_mask"].shape, np.float32)
            out = jax.device_get(eval_fn(params, None, to_global({**batch, "reference_logps": zeros}, 1)))
            rows = np.asarray(batch["row"])
            if jax.process_count() > 1:  # the outputs are global, the rows this host's
                from jax.experimental import multihost_utils

                rows = np.asarray(multihost_utils.process_allgather(rows, tiled=True))
            for i, r in enumerate(rows):
                if r >= 0:
                    table[int(r)] = np.asarray(out["policy_logps"][i], np.float32)
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

    def start(self, state, frozen, meta: dict | None, steps: Steps) -> None:
        """The eval metrics before any update (kept in the checkpoint metadata, so a resumed run reports them)."""
        if meta is not None and meta.get("eval_start"):
            self.eval_start = meta["eval_start"]
        else:
            self.eval_start = steps.evaluate(state, frozen, self.cfg.train.eval_max_batches)
            log.info("step 0 eval: %s", {k: v for k, v in self.eval_start.items() if not isinstance(v, dict)})

    # --- the programs: train step, eval (and the precomputed reference table, from the starting policy)
    def steps(self, mesh, setup: JobSetup, state) -> Steps:
        cfg, d, opt = self.cfg, self.cfg.data, setup.optimizer
        graphdef, ref_graphdef = setup.graphdefs["policy"], setup.graphdefs["reference"]
        specs = dpo_step.dpo_specs(d.attention_layout != "per_answer", self.precomputed)
        ref_shardings = setup.frozen_shardings.get("reference")
        train_fn = dpo_step.jit_train_step(
            graphdef,
            ref_graphdef,
            opt.tx,
            opt.schedule,
            cfg.loss,
            cfg.train.micro_batches,
            mesh,
            jax.tree.map(lambda x: x.sharding, state),
            ref_shardings,
            specs[0].shardings(mesh),
            grad_mask=opt.mask,
            max_grad_norm=cfg.optim.max_grad_norm,
            frozen_layers=self.frozen_layers,
            hydra=self.hydra,
        )
        eval_fn = dpo_step.jit_eval_step(
            graphdef, ref_graphdef, mesh, self._eval_micro_batches(), self.frozen_layers, self.hydra
        )
        rows = sharding.batch_sharding(mesh, 1).spec

        def to_global(batch: dict, which: int) -> dict:
            return data_pipeline.to_global(specs[which].select(batch), mesh, rows)

        if self.precomputed and setup.params is not None and not is_abstract(setup.params):
            # before any update or restore: the starting policy's log-probs (a resumed run recomputes the same)
            self.reference_tables = {
                "train": self.precompute_reference(eval_fn, to_global, setup.params, self._reference_pass_data()),
                "eval": self.precompute_reference(eval_fn, to_global, setup.params, setup.eval_data),
            }

        def train(state, frozen, host_batch):
            batch = to_global(self._with_reference(host_batch, "train"), 0)
            new_state, metrics = train_fn(state, frozen.get("reference"), batch)
            return new_state, metrics, batch_tokens(host_batch)

        def evaluate(state, frozen, max_batches: int = 0) -> dict:
            metrics = DPOMetrics()
            for i, batch in enumerate(iter(setup.eval_data)):
                if max_batches and i >= max_batches:
                    break
                out = jax.device_get(
                    eval_fn(state["params"], frozen.get("reference"), to_global(self._with_reference(batch, "eval"), 1))
                )
                # replicated outputs: every host computes identical metrics over the whole global batch
                metrics.update_logps(
                    out["policy_logps"],
                    out["reference_logps"],
                    out["ranks"],
                    out["answer_mask"],
                    out["answer_lengths"],
                    cfg.loss.beta,
                )
            return metrics.compute()

        dims = lambda b: {  # noqa: E731
            "B": b,
            "K": d.num_answers,
            "R": b * d.num_answers,
            "L": round_up(d.max_length, d.pad_to_multiple),
        }
        frozen_ref = setup.frozen.get("reference")
        reference = None if frozen_ref is None else abstract_params(frozen_ref, ref_shardings)
        programs = [
            Program(
                "update",
                train_fn,
                (state, reference, specs[0].abstract(dims(d.batch_size), mesh)),
                donated=state,
                roles=("state",),
            ),
            Program("eval", eval_fn, (state["params"], reference, specs[1].abstract(dims(d.eval_batch_size), mesh))),
        ]
        return Steps(train, evaluate, programs)

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
