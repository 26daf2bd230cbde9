"""A training job: the short definition the shared loop (`train/loop.py`) runs.

A job says what is particular to it: its models (`ModelEntry`: which are trainable, which frozen), its initial
state, its jitted step, its eval, its export and the keys of its summary. Everything else (output folder and
lock, mesh, checkpoints with resume and data position, preemption, the non-finite guard, log/eval/save cadence,
metrics writer, progress bar, plot, summary, export at the end) is the loop's.

Also here: the config sections every job shares (`TrainConfig`, `ExportConfig`) and the set-up helpers jobs
share (tokenizer folder, model init or import, optimizer).
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from starling_jax import hub
from starling_jax.data import tokenizer as tokenizer_lib
from starling_jax.data.batch_spec import BatchSpec
from starling_jax.errors import ConfigError
from starling_jax.model import create, hf_io
from starling_jax.model.config import ModelConfig
from starling_jax.parallel import sharding
from starling_jax.train.optimizer import OptimConfig, make_optimizer, trainable_mask
from starling_jax.train.runtime import RUNTIME_KEYS
from starling_jax.train.state import ModelEntry, TrainState


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    micro_batches: int = 1  # gradient accumulation: each step's batch is split into this many micro-batches
    eval_every: int = 250
    eval_max_batches: int = 0  # 0 = the whole eval split
    save_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    async_checkpointing: bool = True
    peak_tflops_per_device: float = 0.0  # for MFU; 0 = look up the device kind (TPU/GPU), none on CPU
    progress_bar: bool = True
    # 0: a batch whose loss or gradient is not finite stops the run (nothing after the last checkpoint is saved).
    # N > 0: such a batch is skipped (no update; logged with its rows) and the run stops at the (N+1)-th in a row.
    skip_nonfinite: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.micro_batches < 1 or self.save_every < 1 or self.eval_every < 1:
            raise ConfigError("train.steps, micro_batches, save_every and eval_every must be >= 1")
        if self.skip_nonfinite < 0 or self.log_every < 1:
            raise ConfigError("train.skip_nonfinite must be >= 0 and train.log_every >= 1")


@dataclasses.dataclass
class ExportConfig:
    hf: bool = True  # write an HF folder at the end (output_dir/hf)
    plot: bool = True  # loss curve and the job's eval figure (output_dir/summary.png)


class Job(abc.ABC):
    """Subclasses set `name` and implement the abstract methods; `setup` fills the attributes below."""

    name: str = "job"  # progress bar label
    batch_spec: BatchSpec  # the train step's batch
    window_means: tuple[str, ...] = ("loss",)  # step metrics averaged over a log window (the rest: last value)
    hidden_metrics: tuple[str, ...] = ()  # step metrics not logged

    def __init__(self, cfg):
        self.cfg = cfg  # a run config with output_dir, seed, mesh, train: TrainConfig, export: ExportConfig
        self.models: list[ModelEntry] = []
        self.state: TrainState = {}
        self.state_shardings: TrainState = {}
        self.frozen: dict[str, nnx.State] = {}  # frozen models' params by name (outside the donated state)
        self.frozen_shardings: dict[str, nnx.State] = {}
        self.train_data = None  # iterable of host batches with state() / restore(state)
        self.eval_data = None

    @abc.abstractmethod
    def setup(self, mesh: Mesh) -> None:
        """Tokenizer, data, models, optimizer and initial state (created in their shards)."""

    def start(self, state: TrainState, frozen: dict, meta: dict | None) -> None:
        """Called once before the first step with the (restored) state; `meta`: the resumed checkpoint's, or None
        on a fresh start (e.g. to evaluate at step 0)."""

    @abc.abstractmethod
    def train_step(self, state: TrainState, frozen: dict, host_batch: dict) -> tuple[TrainState, dict]:
        """One jitted, donated update from a host batch → (state, device metrics with `loss` and `finite`)."""

    @abc.abstractmethod
    def evaluate(self, state: TrainState, frozen: dict, max_batches: int = 0) -> dict:
        """Eval metrics (plain floats / dicts) of the current state on the eval split."""

    @abc.abstractmethod
    def abstract_inputs(self, mesh: Mesh) -> tuple[TrainState, dict, Any]:
        """(abstract state, abstract batch, jitted step) with shardings, allocating nothing: what `aot` compiles."""

    def abstract_eval_inputs(self, mesh: Mesh) -> tuple[Any, dict, Any] | None:
        """(abstract eval params, abstract eval batch, jitted eval step) for `aot`, or None."""
        return None

    def meta(self, last_eval: dict) -> dict:
        """Checkpoint metadata besides the models (tokenizer, template, ...)."""
        return {}

    def export(self, state: TrainState, frozen: dict, last_eval: dict, folder: Path) -> Path | None:
        """The HF export at the end of a completed run."""
        return None

    def summary(self, last_eval: dict) -> dict:
        """The job's keys of the closing JSON summary."""
        return {}

    def progress(self, row: dict) -> dict:
        """Progress-bar postfix from a logged row."""
        return {"loss": f"{row['loss']:.4f}"}

    def batch_tokens(self, host_batch: dict) -> tuple[int, int, int]:
        """(real tokens, padded tokens, sequence length) of a host batch, for throughput and MFU."""
        seg = host_batch["segment_ids"]
        return int((seg > 0).sum()), int(seg.size), int(seg.shape[-1])

    def flops_per_token(self, length: int) -> float:
        """Training FLOPs per padded token (forward + backward) of the trainable models, for MFU."""
        return sum(m.config.flops_per_token(length) for m in self.models if m.trainable)

    def batch_rows(self, host_batch: dict) -> list[int]:
        """The data rows of a host batch (for logging a skipped batch)."""
        rows = np.asarray(host_batch.get("row", []))
        return [int(r) for r in rows.reshape(-1) if r >= 0]

    def plot(self, history: list[dict], last_eval: dict, png: Path) -> None:
        """summary.png; default: the train loss curve."""
        fig, axes = new_figure(1)
        plot_loss(axes[0], history, self.name)
        save_figure(fig, png)

    def close(self) -> None:
        for data in (self.train_data, self.eval_data):
            if data is not None and hasattr(data, "close"):
                data.close()


# ------------------------------------------------------------------------------------------------ shared set-up
def resolve_tokenizer_dir(tokenizer: str | None, init_from: str | None, template: str) -> Path:
    """The tokenizer folder: `data.tokenizer`, else init_from's own, else the offline Mistral tokenizer with the
    named template."""
    if tokenizer:
        return tokenizer_lib.resolve_tokenizer_dir(tokenizer, key="data.tokenizer")  # a folder, URL or Hub id
    if init_from:
        model_dir = hub.resolve(init_from, key="init_from")
        if (model_dir / "tokenizer_config.json").is_file():
            return model_dir
    return tokenizer_lib.default_tokenizer_for(template)


def model_runtime(model: ModelConfig) -> dict:
    """The runtime fields of `model` (a run config's `model_config`: `runtime:` applied), which still apply when
    `init_from` fixes the architecture."""
    return {k: getattr(model, k) for k in RUNTIME_KEYS}


def init_model(
    model: ModelConfig, init_from: str | None, role: str, mesh: Mesh, seed: int, pad_token_id: int | None
) -> tuple[ModelConfig, nnx.GraphDef, nnx.State, nnx.State]:
    """→ (model cfg, graphdef, params, params shardings); params created or loaded directly in their shards.
    `model`: the run config's `model_config` (the architecture with the `runtime:` fields)."""
    if init_from:
        model_cfg, graphdef, params = hf_io.load_hf(
            hub.resolve(init_from, key="init_from"),
            role,
            mesh,
            init_missing_head=True,
            seed=seed,
            **model_runtime(model),
        )
    else:
        model_cfg = model
        graphdef, params = create.create_sharded(model_cfg, role, mesh, seed=seed)
    if model_cfg.pad_token_id is None and pad_token_id is not None:
        model_cfg = model_cfg.replace(pad_token_id=int(pad_token_id))
    _, abstract = create.abstract_model(model_cfg, role)
    sharding.assert_sharded(params, mesh)
    return model_cfg, graphdef, params, sharding.state_shardings(abstract, mesh)


def build_optimizer(optim: OptimConfig, total_steps: int, model_cfg: ModelConfig, params):
    """→ (tx, schedule, trainable mask or None); `params` may be abstract (the frozen-layers mask reads shapes)."""
    mask = trainable_mask(params, optim.freeze_layers, model_cfg.num_hidden_layers) if optim.freeze_layers else None
    tx, schedule = make_optimizer(optim, total_steps, mask)
    return tx, schedule, mask


def replicate_mask(mask, mesh: Mesh):
    """A trainable mask as replicated device arrays (it is small: scalars and per-layer vectors)."""
    return None if mask is None else jax.device_put(mask, sharding.replicated(mesh))


# ------------------------------------------------------------------------------------------------ plots
def new_figure(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4))
    return fig, np.atleast_1d(axes)


def plot_loss(ax, history: list[dict], title: str) -> None:
    steps = [r["step"] for r in history if "loss" in r]
    ax.plot(steps, [r["loss"] for r in history if "loss" in r])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(title)


def save_figure(fig, png) -> None:
    """`png`: a local path or a URL (written through its file object)."""
    import matplotlib.pyplot as plt

    from starling_jax.paths import as_path

    fig.tight_layout()
    with as_path(png).open("wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
