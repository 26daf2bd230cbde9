"""The reward-model job: K-wise rankings → a `*ForSequenceClassification` reward model. Run by `train/loop.py`.

Its parts: one trainable model `reward` (role `reward`), the K-wise batch (`data.batch_spec.KWISE_TRAIN`, or
`KWISE_PACKED_TRAIN` for packed / shared-prefix rows), the step
`rm_step.train_step`, ranking metrics on the eval split, and an HF export with the eval split's reward statistics.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from starling_jax.data import pipeline as data_pipeline
from starling_jax.data.batch_spec import kwise_specs, round_up
from starling_jax.data.synthetic import resolve_bundled
from starling_jax.data.tokenizer import load_tokenizer
from starling_jax.errors import CheckpointError
from starling_jax.eval.metrics import RankingMetrics
from starling_jax.model import hf_io
from starling_jax.model.attention import check_layout
from starling_jax.parallel import sharding
from starling_jax.train import loop, rm_step
from starling_jax.train.job import (
    JobSetup,
    OneModelJob,
    Program,
    Steps,
    batch_tokens,
    init_model,
    new_figure,
    plot_loss,
    resolve_tokenizer_dir,
    save_figure,
)
from starling_jax.train.rm_config import RMRunConfig
from starling_jax.train.step import merge_micro_batches, split_micro_batches

log = logging.getLogger("starling_jax")
ROLE = "reward"
MODEL_NAME = "reward"


def build_data(
    cfg: RMRunConfig, tokenizer, tokenizer_dir: Path, **pipeline_options
) -> tuple[data_pipeline.RankingPipeline, data_pipeline.RankingPipeline]:
    """(train, eval) pipelines of `cfg.data`; `pipeline_options`: more `RankingPipeline` arguments (DPO's
    `completions`)."""
    d = cfg.data
    common = dict(
        tokenizer=tokenizer,
        template=d.template,
        max_length=d.max_length,
        on_bad_row=d.on_bad_row,
        tokenizer_name=str(tokenizer_dir),
    )
    train_src = data_pipeline.open_source(
        resolve_bundled(d.train), "train", eval_fraction=0.0 if d.eval else d.eval_fraction, **common
    )
    if d.eval:
        eval_src = data_pipeline.open_source(resolve_bundled(d.eval), "train", eval_fraction=0.0, **common)
    else:
        eval_src = data_pipeline.open_source(resolve_bundled(d.train), "eval", eval_fraction=d.eval_fraction, **common)
    pipe = dict(
        num_answers=d.num_answers,
        max_length=d.max_length,
        pad_to_multiple=d.pad_to_multiple,
        pad_id=tokenizer.pad_token_id or 0,
        layout=d.layout,
        packing=d.packing,
        loader=d.loader,
        **pipeline_options,
    )
    train = data_pipeline.RankingPipeline(
        train_src,
        global_batch_size=d.batch_size,
        seed=cfg.seed,
        mode="train",
        micro_batches=cfg.train.micro_batches,
        **pipe,
    )
    evals = data_pipeline.RankingPipeline(
        eval_src, global_batch_size=d.eval_batch_size, seed=cfg.seed, mode="eval", **pipe
    )
    return train, evals


def skipped_data_rows(*pipelines) -> list[dict]:
    """Rows dropped by on_bad_row=skip while reading files (invalid or too long), each once, in file order.
    (Prepared datasets were validated by prepare_data, whose report.json lists theirs.)"""
    seen = {}
    for p in pipelines:
        report = getattr(p.source, "report", None)
        for s in report.skipped if report is not None else ():
            seen.setdefault((report.source, s["row"]), {"source": report.source, **s})
    return [seen[k] for k in sorted(seen)]


def eval_step(params, batch, *, graphdef, mesh, micro_batches: int = 1):
    """Rewards of an eval batch (in `micro_batches` interleaved chunks under `lax.map`, as the train step splits
    its batch, so that eval fits wherever training fits), with the fields the metrics read."""
    if micro_batches == 1:
        rewards = rm_step.eval_rewards(params, batch, graphdef=graphdef, mesh=mesh)
    else:
        micro = split_micro_batches(rm_step.train_spec(batch).select(batch), micro_batches)
        rewards = merge_micro_batches(
            jax.lax.map(lambda mb: rm_step.eval_rewards(params, mb, graphdef=graphdef, mesh=mesh), micro)
        )
    return {
        "rewards": rewards,
        "ranks": batch["ranks"],
        "answer_mask": batch["answer_mask"],
        "answer_lengths": batch["answer_lengths"],
    }


def reward_stats(eval_metrics: dict) -> dict:
    """Stored in the exported config.json so that PPO can normalize rewards (as OpenRLHF does)."""
    return {"reward_mean": eval_metrics.get("reward_mean"), "reward_std": eval_metrics.get("reward_std")}


class RMJob(OneModelJob):
    model_name, role = MODEL_NAME, ROLE
    name = "train_rm"
    window_means = ("loss", "batch_pairwise_accuracy")
    hidden_metrics = ("num_prompts",)

    def __init__(self, cfg: RMRunConfig):
        super().__init__(cfg)
        self.skipped_rows: list[dict] = []

    # --- set-up
    def setup(self, mesh) -> JobSetup:
        cfg, d = self.cfg, self.cfg.data
        self.tokenizer_dir = resolve_tokenizer_dir(d.tokenizer, cfg.init_from, d.template)
        tokenizer = load_tokenizer(self.tokenizer_dir)
        self.train_data, self.eval_data = build_data(
            cfg, tokenizer, self.tokenizer_dir, row_multiple=sharding.packed_row_multiple(mesh)
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
            cfg.model_config, cfg.init_from, ROLE, mesh, cfg.seed, tokenizer.pad_token_id
        )
        if model_cfg.vocab_size < len(tokenizer):
            raise CheckpointError(f"model vocab_size={model_cfg.vocab_size} < tokenizer size {len(tokenizer)}")
        # init_from's config.json may bring its own window
        check_layout(model_cfg.attention_impl, cfg.data.attention_layout, model_cfg.sliding_window, cfg.data.max_length)
        data = (self.train_data, self.eval_data)
        return self.one_model_setup(mesh, model_cfg, graphdef, params, params_shardings, *data)

    def _eval_micro_batches(self) -> int:
        """As many eval micro-batches as the train step's rows per micro-batch ask for (eval rows ≤ train's)."""
        d = self.cfg.data
        if d.attention_layout != "per_answer":  # packed eval rows are not laid out in micro-batch classes
            return 1
        rows = max(d.batch_size // self.cfg.train.micro_batches, 1)
        micro = max(1, d.eval_batch_size // rows)
        while d.eval_batch_size % micro:
            micro -= 1
        return micro

    def batch_dims(self, rows: int) -> dict:
        d = self.cfg.data
        # Packed rows: at most one row per answer (the pipeline needs fewer; this bounds the compiled program).
        return {
            "B": rows,
            "K": d.num_answers,
            "R": rows * d.num_answers,
            "L": round_up(d.max_length, d.pad_to_multiple),
        }

    # --- the programs: train step, eval
    def steps(self, mesh, setup: JobSetup, state) -> Steps:
        cfg, opt = self.cfg, setup.optimizer
        graphdef = setup.graphdefs[MODEL_NAME]
        # Packed / shared-prefix rows (data/layout.py) change the row fields' shapes, not the step's maths.
        train_spec, eval_spec = kwise_specs(cfg.data.attention_layout != "per_answer")
        shardings = jax.tree.map(lambda x: x.sharding, state)
        train_fn = rm_step.jit_train_step(
            graphdef,
            opt.tx,
            opt.schedule,
            cfg.loss,
            cfg.train.micro_batches,
            mesh,
            shardings,
            train_spec.shardings(mesh),
            grad_mask=opt.mask,
            max_grad_norm=cfg.optim.max_grad_norm,
        )
        eval_fn = jax.jit(
            functools.partial(eval_step, graphdef=graphdef, mesh=mesh, micro_batches=self._eval_micro_batches()),
            out_shardings=sharding.replicated(mesh),
        )
        rows = sharding.batch_sharding(mesh, 1).spec

        def train(state, frozen, host_batch):
            new_state, metrics = train_fn(state, data_pipeline.to_global(train_spec.select(host_batch), mesh, rows))
            return new_state, metrics, batch_tokens(host_batch)

        def evaluate(state, frozen, max_batches: int = 0) -> dict:
            metrics = RankingMetrics()
            for i, batch in enumerate(iter(setup.eval_data)):
                if max_batches and i >= max_batches:
                    break
                out = eval_fn(state["params"], data_pipeline.to_global(eval_spec.select(batch), mesh, rows))
                # The outputs are replicated, so every host computes identical metrics over the whole global batch.
                full = jax.device_get(out)
                metrics.update(
                    np.asarray(full["rewards"]),
                    np.asarray(full["ranks"]),
                    np.asarray(full["answer_mask"]),
                    np.asarray(full["answer_lengths"]),
                )
            return metrics.compute()

        d = cfg.data
        params = state["params"]
        programs = [
            Program(
                "update",
                train_fn,
                (state, train_spec.abstract(self.batch_dims(d.batch_size), mesh)),
                donated=state,
                roles=("state",),
            ),
            Program("eval", eval_fn, (params, eval_spec.abstract(self.batch_dims(d.eval_batch_size), mesh))),
        ]
        return Steps(train, evaluate, programs)

    # --- metadata, export, summary, plot
    def meta(self, last_eval: dict) -> dict:
        return {
            "tokenizer_dir": str(self.tokenizer_dir),
            "template": self.cfg.data.template,
            "max_length": self.cfg.data.max_length,
            # what the training data was tokenized with (a prepared dataset's own record)
            "data": self.train_data.source.provenance,
        }

    def export(self, state, frozen, last_eval, folder: Path) -> Path:
        return hf_io.save_hf(
            folder,
            self.model_cfg,
            state["params"],
            ROLE,
            tokenizer_dir=self.tokenizer_dir,
            template=self.cfg.data.template,
            extra_config={**reward_stats(last_eval), "starling_jax_data": self.train_data.source.provenance},
        )

    def summary(self, last_eval: dict) -> dict:
        return {
            "train_prompts": self.train_data.num_examples,
            "eval_prompts": self.eval_data.num_examples,
            "rows_skipped": len(self.skipped_rows),
            "eval_pairwise_accuracy": last_eval.get("pairwise_accuracy"),
            "eval_top1_accuracy": last_eval.get("top1_accuracy"),
            "eval_kendall_tau": last_eval.get("kendall_tau"),
            "eval_mean_reward_by_rank": last_eval.get("mean_reward_by_rank"),
            "eval_reward_length_correlation": last_eval.get("reward_length_correlation"),
        }

    def progress(self, row: dict) -> dict:
        return {"loss": f"{row['loss']:.4f}", "acc": f"{row['batch_pairwise_accuracy']:.3f}"}

    def plot(self, history: list[dict], last_eval: dict, png: Path) -> None:
        fig, (ax1, ax2) = new_figure(2)
        plot_loss(ax1, history, "ranking loss")
        by_rank = last_eval.get("mean_reward_by_rank") or {}
        ranks = sorted(by_rank, key=float)
        ax2.bar(range(len(ranks)), [by_rank[r] for r in ranks], tick_label=[str(r) for r in ranks])
        ax2.set_xlabel("rank (1 = best)")
        ax2.set_ylabel("mean reward")
        ax2.set_title(f"eval: pairwise acc {last_eval.get('pairwise_accuracy') or 0:.3f}")
        save_figure(fig, png)


def train_reward_model(cfg: RMRunConfig) -> dict[str, Any]:
    return loop.run(RMJob(cfg))
