"""Reward-model training, in named phases: output & logging → mesh → tokenizer & data → model & optimizer →
checkpoint (resume) → jitted steps → loop (eval, save, preemption) → export & summary.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from starling_jax import config as config_lib
from starling_jax import tokenizer as tokenizer_lib
from starling_jax.ckpt.manager import Checkpointer, check_architecture
from starling_jax.data import pipeline as data_pipeline
from starling_jax.errors import CheckpointError, TrainingError
from starling_jax.metrics import RankingMetrics
from starling_jax.model import create, hf_io
from starling_jax.model.config import ModelConfig
from starling_jax.parallel import sharding
from starling_jax.train import rm_step
from starling_jax.train.optimizer import make_optimizer, trainable_mask
from starling_jax.data.synthetic import resolve_bundled
from starling_jax.train.rm_config import RMRunConfig
from starling_jax.train.state import abstract_train_state, init_train_state, state_shardings

log = logging.getLogger("starling_jax")
ROLE = "reward"
STEP_KEYS = rm_step.BATCH_KEYS
EVAL_KEYS = rm_step.BATCH_KEYS + ("answer_lengths",)

# Peak dense bf16 FLOP/s per chip, for MFU (vendor figures).
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
               "TPU v6 lite": 918.0, "TPU v6e": 918.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_flops(cfg_value: float, device_kind: str | None = None) -> float | None:
    """Peak FLOP/s of one chip: the configured value, else looked up by device kind (default: this process's)."""
    if cfg_value:
        return cfg_value * 1e12
    kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None


# ------------------------------------------------------------------------------------------------ pieces
def resolve_tokenizer_dir(cfg: RMRunConfig) -> Path:
    if cfg.data.tokenizer:
        return tokenizer_lib.resolve_tokenizer_dir(cfg.data.tokenizer)  # a folder or a Hub id
    if cfg.init_from:
        model_dir = hf_io.resolve_model_dir(cfg.init_from)
        if (model_dir / "tokenizer_config.json").is_file():
            return model_dir
    return tokenizer_lib.default_tokenizer_for(cfg.data.template)


def build_data(cfg: RMRunConfig, tokenizer) -> tuple[data_pipeline.RankingPipeline, data_pipeline.RankingPipeline]:
    d = cfg.data
    common = dict(tokenizer=tokenizer, template=d.template, max_length=d.max_length, on_bad_row=d.on_bad_row,
                  tokenizer_name=str(resolve_tokenizer_dir(cfg)))
    train_src = data_pipeline.open_source(resolve_bundled(d.train), "train",
                                          eval_fraction=0.0 if d.eval else d.eval_fraction, **common)
    if d.eval:
        eval_src = data_pipeline.open_source(resolve_bundled(d.eval), "train", eval_fraction=0.0, **common)
    else:
        eval_src = data_pipeline.open_source(resolve_bundled(d.train), "eval", eval_fraction=d.eval_fraction, **common)
    pipe = dict(num_answers=d.num_answers, max_length=d.max_length, pad_to_multiple=d.pad_to_multiple,
                pad_id=tokenizer.pad_token_id or 0)
    train = data_pipeline.RankingPipeline(train_src, global_batch_size=d.batch_size, seed=cfg.seed, mode="train",
                                          **pipe)
    evals = data_pipeline.RankingPipeline(eval_src, global_batch_size=d.eval_batch_size, seed=cfg.seed,
                                          mode="eval", **pipe)
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


def model_runtime(cfg: RMRunConfig) -> dict:
    """The `model.*` fields that still apply when `init_from` fixes the architecture."""
    return dict(param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype, remat_policy=cfg.model.remat_policy,
                scan_layers=cfg.model.scan_layers, attention_impl=cfg.model.attention_impl)


def build_optimizer(cfg: RMRunConfig, model_cfg: ModelConfig, params):
    """→ (tx, schedule); `params` may be abstract (only shapes are read, for the frozen-layers mask)."""
    mask = trainable_mask(params, cfg.optim.freeze_layers, model_cfg.num_hidden_layers) \
        if cfg.optim.freeze_layers else None
    return make_optimizer(cfg.optim, cfg.train.steps, mask)


def step_batch_shardings(mesh) -> dict:
    """Shardings of the train step's batch: the leading (prompt) axis over every data-parallel mesh axis."""
    return {k: sharding.batch_sharding(mesh, 3 if k in ("tokens", "positions", "segment_ids") else 2)
            for k in STEP_KEYS}


def build_model(cfg: RMRunConfig, mesh, tokenizer_pad_id: int | None):
    """→ (model cfg, graphdef, params, params shardings); params created or loaded directly in their shards."""
    runtime = model_runtime(cfg)
    if cfg.init_from:
        model_cfg, graphdef, params = hf_io.load_hf(cfg.init_from, ROLE, mesh, init_missing_head=True,
                                                    seed=cfg.seed, **runtime)
    else:
        model_cfg = cfg.model
        graphdef, params = create.create_sharded(model_cfg, ROLE, mesh, seed=cfg.seed)
    if model_cfg.pad_token_id is None and tokenizer_pad_id is not None:
        model_cfg = model_cfg.replace(pad_token_id=int(tokenizer_pad_id))
    _, abstract = create.abstract_model(model_cfg, ROLE)
    return model_cfg, graphdef, params, sharding.state_shardings(abstract, mesh)


def run_meta(cfg: RMRunConfig, model_cfg: ModelConfig, tokenizer_dir: Path, eval_metrics: dict | None,
             data_provenance: dict | None = None) -> dict:
    return {
        "role": ROLE,
        "architecture": model_cfg.architecture_dict(),
        "model": config_lib.to_dict(model_cfg),
        "tokenizer_dir": str(tokenizer_dir),
        "template": cfg.data.template,
        "max_length": cfg.data.max_length,
        "data": data_provenance,  # what the training data was tokenized with (the prepared dataset's record)
        "run_config": config_lib.to_dict(cfg),
        "eval": eval_metrics or {},
    }


def evaluate(eval_fn, params, pipeline, mesh, max_batches: int = 0) -> dict:
    metrics = RankingMetrics()
    for i, batch in enumerate(iter(pipeline)):
        if max_batches and i >= max_batches:
            break
        out = eval_fn(params, data_pipeline.to_global({k: batch[k] for k in EVAL_KEYS}, mesh,
                                                      sharding.batch_sharding(mesh, 1).spec))
        # The outputs are replicated, so every host computes identical metrics over the whole global batch.
        full = jax.device_get(out)
        metrics.update(np.asarray(full["rewards"]), np.asarray(full["ranks"]), np.asarray(full["answer_mask"]),
                       np.asarray(full["answer_lengths"]))
    pipeline.restore({"epoch": 0, "batch": 0})
    return metrics.compute()


def eval_step(params, batch, *, graphdef, mesh):
    rewards = rm_step.eval_rewards(params, batch, graphdef=graphdef, mesh=mesh)
    return {"rewards": rewards, "ranks": batch["ranks"], "answer_mask": batch["answer_mask"],
            "answer_lengths": batch["answer_lengths"]}


class Preemption:
    """SIGTERM (the TPU preemption notice) sets a flag; the loop saves at the next step boundary and exits."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def check(self) -> bool:
        flag = self.requested
        if jax.process_count() > 1:  # every host must stop at the same step
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
        return flag

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


# ------------------------------------------------------------------------------------------------ main loop
def train_reward_model(cfg: RMRunConfig) -> dict[str, Any]:
    # --- output & logging
    out = Path(cfg.output_dir).absolute()
    is_main = jax.process_index() == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        config_lib.save_config(cfg, out / "config.yaml")

    # --- mesh
    mesh = sharding.make_mesh(cfg.mesh)
    log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].device_kind)

    # --- tokenizer & data
    from starling_jax.tokenizer import load_tokenizer

    tokenizer_dir = resolve_tokenizer_dir(cfg)
    tokenizer = load_tokenizer(tokenizer_dir)
    train_data, eval_data = build_data(cfg, tokenizer)
    log.info("data: %d train / %d eval prompts", train_data.num_examples, eval_data.num_examples)
    skipped_rows = skipped_data_rows(train_data, eval_data)
    if skipped_rows:
        log.warning("data: skipped %d bad row(s) (data.on_bad_row=skip), e.g. %s", len(skipped_rows),
                    "; ".join(f"{s['source']} row {s['row']}: {s['reason']}" for s in skipped_rows[:3]))

    # --- model & optimizer
    model_cfg, graphdef, params, params_shardings = build_model(cfg, mesh, tokenizer.pad_token_id)
    if model_cfg.vocab_size < len(tokenizer):
        raise CheckpointError(f"model vocab_size={model_cfg.vocab_size} < tokenizer size {len(tokenizer)}")
    sharding.assert_sharded(params, mesh)
    tx, schedule = build_optimizer(cfg, model_cfg, params)
    state, shardings = init_train_state(params, params_shardings, tx, mesh, cfg.seed)

    # --- checkpoint: resume from the latest complete one
    ckpt = Checkpointer(out / "checkpoints", max_to_keep=cfg.train.keep_checkpoints,
                        async_save=cfg.train.async_checkpointing)
    resumed_from = ckpt.latest_step()
    last_eval: dict = {}
    if resumed_from is not None:
        meta = ckpt.read_meta(resumed_from)
        check_architecture(meta, model_cfg.architecture_dict(), f"{ckpt.directory}/{resumed_from}")
        state, data_state, meta = ckpt.restore(abstract_train_state(state, shardings), resumed_from)
        train_data.restore(data_state)
        last_eval = meta.get("eval", {})
        log.info("resumed from step %d (data position %s)", resumed_from, data_state)

    # --- jitted steps
    batch_spec = sharding.batch_sharding(mesh, 1).spec
    step_fn = rm_step.jit_train_step(graphdef, tx, schedule, cfg.loss, cfg.train.micro_batches, mesh, shardings,
                                     step_batch_shardings(mesh))
    eval_fn = jax.jit(lambda p, b: eval_step(p, b, graphdef=graphdef, mesh=mesh),
                      out_shardings=sharding.replicated(mesh))

    # --- loop
    writer = None
    if is_main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    history_path = out / "metrics.jsonl"
    peak = peak_flops(cfg.train.peak_tflops_per_device)
    preemption = Preemption()
    step = int(jax.device_get(state["step"]))
    start_step = step
    pending: list[tuple[int, Any, int, int]] = []  # (step, device metrics, real tokens, padded tokens)
    window_start, window_tokens, window_padded = time.perf_counter(), 0, 0
    status = "completed"
    progress = _progress(cfg, start_step, is_main)

    def drain() -> dict | None:
        """Fetch pending step metrics; a non-finite loss stops the run before anything is saved."""
        nonlocal window_start, window_tokens, window_padded
        if not pending:
            return None
        fetched = jax.device_get([m for _, m, _, _ in pending])
        for (s, _, _, _), m in zip(pending, fetched):
            if not bool(m["finite"]):
                raise TrainingError(
                    f"step {s}: loss={float(m['loss'])} grad_norm={float(m['grad_norm'])} is not finite; that "
                    f"update was not applied and nothing was checkpointed after step {ckpt.latest_step()}. "
                    "Lower optim.learning_rate or check the data.")
        elapsed = max(time.perf_counter() - window_start, 1e-9)
        last_step, last = pending[-1][0], fetched[-1]
        row = {"step": last_step, "loss": float(np.mean([float(m["loss"]) for m in fetched])),
               "grad_norm": float(last["grad_norm"]), "learning_rate": float(last["learning_rate"]),
               "batch_pairwise_accuracy": float(np.mean([float(m["batch_pairwise_accuracy"]) for m in fetched])),
               "tokens_per_s": window_tokens / elapsed}
        if peak:
            row["mfu"] = window_padded * model_cfg.flops_per_token(_mean_len(pending)) / elapsed / (peak * mesh.size)
        pending.clear()
        window_start, window_tokens, window_padded = time.perf_counter(), 0, 0
        if is_main:
            for key, value in row.items():
                if key != "step":
                    writer.add_scalar(f"train/{key}", value, last_step)
            with history_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def save(at_step: int, force: bool = False):
        drain()
        ckpt.save(at_step, state, train_data.state(), run_meta(cfg, model_cfg, tokenizer_dir, last_eval,
                                                                      train_data.source.provenance), force=force)

    try:
        train_iter = iter(train_data)
        while step < cfg.train.steps:
            host_batch = next(train_iter)
            real = int((host_batch["segment_ids"] > 0).sum())
            padded = int(host_batch["segment_ids"].size)
            batch = data_pipeline.to_global({k: host_batch[k] for k in STEP_KEYS}, mesh, batch_spec)
            state, metrics = step_fn(state, batch)
            step += 1
            pending.append((step, metrics, host_batch["segment_ids"].shape[-1], padded))
            window_tokens += real * jax.process_count()
            window_padded += padded * jax.process_count()
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                row = drain()
                if progress is not None and row:
                    progress.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['batch_pairwise_accuracy']:.3f}")
            if progress is not None:
                progress.update(1)
            if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                drain()
                last_eval = evaluate(eval_fn, state["params"], eval_data, mesh, cfg.train.eval_max_batches)
                _log_eval(writer, last_eval, step)
                log.info("step %d eval: %s", step, {k: v for k, v in last_eval.items() if not isinstance(v, dict)})
            if step % cfg.train.save_every == 0 or step == cfg.train.steps:
                save(step)
            if preemption.check():
                save(step, force=True)
                status = "preempted"
                break
        drain()
        ckpt.wait()
    finally:
        preemption.restore()
        if progress is not None:
            progress.close()
        ckpt.close()
        if writer is not None:
            writer.close()

    # --- export & summary
    hf_dir = None
    if status == "completed":
        if not last_eval:
            last_eval = evaluate(eval_fn, state["params"], eval_data, mesh, cfg.train.eval_max_batches)
        if cfg.export.hf:
            hf_dir = out / "hf"
            hf_io.save_hf(hf_dir, model_cfg, state["params"], ROLE, tokenizer_dir=tokenizer_dir,
                          template=cfg.data.template, extra_config={
                              **reward_stats(last_eval), "starling_jax_data": train_data.source.provenance})
        if cfg.export.plot and is_main:
            plot_summary(history_path, last_eval, out / "summary.png")
    return {
        "status": status,
        "output_dir": str(out),
        "steps": step,
        "resumed_from": resumed_from,
        "train_prompts": train_data.num_examples,
        "eval_prompts": eval_data.num_examples,
        "rows_skipped": len(skipped_rows),
        "eval_pairwise_accuracy": last_eval.get("pairwise_accuracy"),
        "eval_top1_accuracy": last_eval.get("top1_accuracy"),
        "eval_kendall_tau": last_eval.get("kendall_tau"),
        "eval_mean_reward_by_rank": last_eval.get("mean_reward_by_rank"),
        "eval_reward_length_correlation": last_eval.get("reward_length_correlation"),
        "checkpoint_dir": str(out / "checkpoints"),
        "hf_export_dir": str(hf_dir) if hf_dir else None,
    }


def reward_stats(eval_metrics: dict) -> dict:
    """Stored in the exported config.json so that PPO can normalize rewards (as OpenRLHF does)."""
    return {"reward_mean": eval_metrics.get("reward_mean"), "reward_std": eval_metrics.get("reward_std")}


def _mean_len(pending) -> int:
    return int(np.mean([length for _, _, length, _ in pending]))


def _progress(cfg: RMRunConfig, start: int, is_main: bool):
    if not (cfg.train.progress_bar and is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.steps, initial=start, desc="train_rm", unit="step", dynamic_ncols=True)


def _log_eval(writer, metrics: dict, step: int) -> None:
    if writer is None:
        return
    for key, value in metrics.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                if v is not None:
                    writer.add_scalar(f"eval/{key}/{sub}", v, step)
        elif isinstance(value, (int, float)) and value is not None and math.isfinite(value):
            writer.add_scalar(f"eval/{key}", value, step)


def plot_summary(history_path: Path, eval_metrics: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[int, dict] = {}
    if history_path.is_file():
        for line in history_path.read_text().splitlines():
            row = json.loads(line)
            rows[row["step"]] = row  # a resumed run rewrites steps after its checkpoint: keep the latest
    steps = sorted(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [rows[s]["loss"] for s in steps])
    ax1.set_xlabel("step")
    ax1.set_ylabel("train loss")
    ax1.set_title("ranking loss")
    by_rank = eval_metrics.get("mean_reward_by_rank") or {}
    ranks = sorted(by_rank, key=float)
    ax2.bar(range(len(ranks)), [by_rank[r] for r in ranks], tick_label=[str(r) for r in ranks])
    ax2.set_xlabel("rank (1 = best)")
    ax2.set_ylabel("mean reward")
    ax2.set_title(f"eval: pairwise acc {eval_metrics.get('pairwise_accuracy') or 0:.3f}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
