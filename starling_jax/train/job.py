"""A training job: the short definition the shared loop (`train/loop.py`) runs.

A job says what is particular to it: its set-up (`JobSetup`: models — which are trainable, which frozen —,
params, optimizer, data), its jitted programs (`Steps`: the train step, whose every update is
`step.apply_update`; the eval; the programs `aot` compiles), its export and the keys of its summary. Everything
else (output folder and lock, mesh, the train state (`state.build_train_state`), checkpoints with resume and data
position, preemption, the non-finite policy, log/eval/save cadence, metrics writer, progress bar, plot, summary,
export at the end) is the loop's. The same methods, on abstract arrays, are what `aot` compiles.

Also here: the config sections every job shares (`TrainConfig`, `ExportConfig`) and the set-up helpers jobs
share (tokenizer folder, model init or import, optimizer).
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from starling_jax import hub
from starling_jax.data import tokenizer as tokenizer_lib
from starling_jax.data.resumable import ResumableIterator
from starling_jax.errors import ConfigError
from starling_jax.model import create, hf_io
from starling_jax.model.architectures import architecture
from starling_jax.model.config import ModelConfig
from starling_jax.parallel import sharding
from starling_jax.train.optimizer import OptimConfig, make_optimizer, trainable_mask
from starling_jax.train.runtime import RUNTIME_KEYS
from starling_jax.train.state import ModelEntry, TrainState, is_abstract


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


@dataclasses.dataclass
class Optimizer:
    tx: optax.GradientTransformation  # over every trainable model (frozen layers masked)
    schedule: optax.Schedule  # the learning rate by update count (logged as `learning_rate`)
    mask: Any = None  # the trainable mask (replicated), for the gradient norm over trainable entries; None = all


@dataclasses.dataclass
class JobSetup:
    """What `Job.setup` returns: everything the loop builds the run from. `Job.abstract_setup` returns the same
    with `ShapeDtypeStruct`s (with shardings) and no data: nothing is read or allocated."""

    models: list[ModelEntry]  # every model the job holds (checkpoint metadata, restore by name)
    graphdefs: dict[str, nnx.GraphDef]  # by model name (a hydra reference: its own)
    params: Any  # the trainable model's nnx.State, or {name: nnx.State} for several (RL: actor, critic)
    params_shardings: Any
    optimizer: Optimizer
    frozen: dict[str, Any] = dataclasses.field(default_factory=dict)  # frozen models' params by name
    frozen_shardings: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra_state: dict[str, Any] = dataclasses.field(default_factory=dict)  # more replicated state leaves (host)
    train_data: ResumableIterator | None = None
    eval_data: ResumableIterator | None = None

    def close(self) -> None:
        for data in (self.train_data, self.eval_data):
            if data is not None and hasattr(data, "close"):
                data.close()


class Tokens(NamedTuple):
    """A train step's tokens, for throughput and MFU."""

    real: int
    padded: int
    length: int  # sequence length (the FLOPs per token depend on it)


@dataclasses.dataclass
class Program:
    """A jitted program of a job with abstract arguments at the run's shapes: what `aot` compiles."""

    name: str  # "update" (the donated train step), "eval", RL: "rollout", "score", "experience", "eval_*"
    fn: Any
    args: tuple
    donated: Any = None  # the donated argument (aliased by the outputs), or None
    roles: tuple[str, ...] = ()  # the resident roles passed in `args` ("state": the trainable models + optimizer)
    rows: int = 0
    length: int = 0


@dataclasses.dataclass
class Steps:
    """What `Job.steps` returns, built once per run (and by `aot`) from the set-up and the abstract state.

    `train(state, frozen, host_batch) → (state, device metrics, Tokens)`: one loop step (RL: one rollout
    iteration); every optimizer update in it is `step.apply_update` (non-finite guard, rng advance, learning
    rate, gradient norm over trainable entries), whose metrics (`loss`, `finite`, `grad_norm`, `learning_rate`)
    the step returns. `evaluate(state, frozen, max_batches) → metrics`. `programs`: the jitted programs `train`
    and `evaluate` call, with abstract arguments."""

    train: Callable[[TrainState, dict, dict], tuple[TrainState, dict, Tokens]]
    evaluate: Callable[[TrainState, dict, int], dict]
    programs: list[Program]


def batch_tokens(host_batch: dict) -> Tokens:
    """(real tokens, padded tokens, sequence length) of a host batch with `segment_ids`."""
    seg = host_batch["segment_ids"]
    return Tokens(int((seg > 0).sum()), int(seg.size), int(seg.shape[-1]))


class Job(abc.ABC):
    """Subclasses set `name` and implement the abstract methods. The loop (`train/loop.py`) runs:

        setup = job.setup(mesh)                               # typed: models, params, optimizer, frozen, data
        state, shardings = build_train_state(setup...)        # the one state builder (train/state.py)
        steps = job.steps(mesh, setup, abstract state)        # jitted once; every update is step.apply_update
        job.start(state, frozen, meta, steps); loop: steps.train(state, frozen, next(setup.train_data))

    and `aot` asks every job the same question: `steps(mesh, abstract_setup(mesh, architectures()), abstract
    state).programs`."""

    name: str = "job"  # progress bar label
    window_means: tuple[str, ...] = ("loss",)  # step metrics averaged over a log window (the rest: last value)
    hidden_metrics: tuple[str, ...] = ()  # step metrics not logged

    def __init__(self, cfg):
        self.cfg = cfg  # a run config with output_dir, seed, mesh, train: TrainConfig, export: ExportConfig
        self.models: list[ModelEntry] = []  # set by setup (flops_per_token, export read them)

    @abc.abstractmethod
    def setup(self, mesh: Mesh) -> JobSetup:
        """Tokenizer, data, models and optimizer (params created or loaded in their shards)."""

    @abc.abstractmethod
    def architectures(self) -> dict[str, ModelConfig]:
        """The models' architectures by name, from the config alone (no weights read): what `aot` starts from."""

    @abc.abstractmethod
    def abstract_setup(self, mesh: Mesh, architectures: dict[str, ModelConfig]) -> JobSetup:
        """`setup` with abstract params (nothing read or allocated), for `architectures` (`aot` may shorten
        them)."""

    @abc.abstractmethod
    def steps(self, mesh: Mesh, setup: JobSetup, state: TrainState) -> Steps:
        """The jitted programs (built once) over `state` (abstract, with shardings) and the set-up."""

    def start(self, state: TrainState, frozen: dict, meta: dict | None, steps: Steps) -> None:
        """Called once before the first step with the (restored) state; `meta`: the resumed checkpoint's, or None
        on a fresh start (e.g. to evaluate at step 0)."""

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


def run_architecture(model: ModelConfig, init_from: str | None) -> ModelConfig:
    """The architecture a run trains, with its runtime fields: `init_from`'s (its config.json, or the built-in
    table of Hub configs; no weights read), else `model` (a run config's `model_config`)."""
    if init_from:
        return architecture(init_from, "init_from", **model_runtime(model))
    return model


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


def build_optimizer(optim: OptimConfig, total_steps: int, model_cfg: ModelConfig, params, mesh: Mesh) -> Optimizer:
    """The optimizer of one trainable model; `params` may be abstract (the frozen-layers mask reads shapes; it is
    then left on the host, else replicated on `mesh`)."""
    mask = trainable_mask(params, optim.freeze_layers, model_cfg.num_hidden_layers) if optim.freeze_layers else None
    tx, schedule = make_optimizer(optim, total_steps, mask)
    return Optimizer(tx, schedule, mask if is_abstract(params) else replicate_mask(mask, mesh))


class OneModelJob(Job):
    """A job that trains one model and holds no frozen one (reward model, SFT): its `architectures`,
    `abstract_setup` and the `JobSetup` its `setup` returns, built one way for the run and for `aot`. Subclasses
    set `model_name` and `role`."""

    model_name: str
    role: str

    def architectures(self) -> dict[str, ModelConfig]:
        return {self.model_name: run_architecture(self.cfg.model_config, self.cfg.init_from)}

    def abstract_setup(self, mesh: Mesh, architectures: dict[str, ModelConfig]) -> JobSetup:
        model_cfg = architectures[self.model_name]
        graphdef, params = create.abstract_model(model_cfg, self.role)
        return self.one_model_setup(mesh, model_cfg, graphdef, params, sharding.state_shardings(params, mesh))

    def one_model_setup(
        self, mesh: Mesh, model_cfg: ModelConfig, graphdef, params, params_shardings, train_data=None, eval_data=None
    ) -> JobSetup:
        self.model_cfg = model_cfg
        self.models = [ModelEntry(self.model_name, self.role, model_cfg, trainable=True)]
        return JobSetup(
            models=self.models,
            graphdefs={self.model_name: graphdef},
            params=params,
            params_shardings=params_shardings,
            optimizer=build_optimizer(self.cfg.optim, self.cfg.train.steps, model_cfg, params, mesh),
            train_data=train_data,
            eval_data=eval_data,
        )


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
