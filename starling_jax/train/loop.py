"""The shared training loop: everything a run needs besides its job (`train/job.py`).

    output folder (locked, resolved config) → mesh → job.setup (a `JobSetup`) → the train state
    (`state.build_train_state`) → job.steps (jitted once) → checkpoint (resume: state, frozen models, data
    position) → steps (non-finite policy, log / eval / save cadence, preemption) → export, plot, summary

Pieces: `OutputLock` (one live run per output_dir), `Preemption` (SIGTERM → save at the next step boundary),
`MetricsWriter` (TensorBoard + metrics.jsonl on process 0), `StepWindow` (pending device metrics, throughput, MFU,
the non-finite policy), `run` (the loop itself).

`output_dir` may be a URL (`gs://bucket/run`, see `paths.py`): checkpoints go there through Orbax, config.yaml,
summary.png and the HF export through epath; TensorBoard and metrics.jsonl are written to a local folder and
copied up at every checkpoint and at the end; there is no lock (Cloud Storage has no `flock`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import OmegaConf
from tensorboardX import SummaryWriter

from starling_jax import config as config_lib
from starling_jax.ckpt.manager import Checkpointer, models_meta
from starling_jax.errors import ConfigError, TrainingError
from starling_jax.parallel import hardware, sharding
from starling_jax.paths import AnyPath, as_path, copy_file, is_url
from starling_jax.train.job import Job, JobSetup, Tokens
from starling_jax.train.state import abstract_params, abstract_train_state, build_train_state

log = logging.getLogger("starling_jax")


class OutputLock:
    """An exclusive `flock` on `<output_dir>/.lock` held by process 0 for the whole run.

    A second run on the same folder is refused with a one-line error instead of interleaving checkpoints and
    metrics with the live one. The kernel drops the lock when its process dies, so a killed run (SIGKILL,
    preemption) leaves nothing stale behind: the next run resumes.

    A URL output_dir (`gs://...`) is not locked: Cloud Storage has no `flock` and a lock object there would be
    left stale by a preempted run. The run logs one warning and relies on the launcher running one job per
    output_dir (`launch/tpu.sh` does).
    """

    def __init__(self, out: AnyPath, enabled: bool = True):
        self.path = out / ".lock"
        self._fd = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if is_url(out):
            log.warning(
                "%s: output_dir is a URL: not locked against a second run (Cloud Storage has no flock); "
                "run one job per output_dir",
                out,
            )
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise TrainingError(
                f"{out}: another run (pid {holder}) is training in this output_dir; wait for it, "
                "stop it, or choose another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


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


class MetricsWriter:
    """TensorBoard scalars and one JSON line per logged row (`metrics.jsonl`), on process 0 only.

    For a URL `out` both are written to a local staging folder (tensorboardX and appends need a local file;
    Cloud Storage objects cannot be appended to) and `sync()` copies them up: the loop calls it at every
    checkpoint and at the end, so what is there covers at least the run up to its latest checkpoint. A resumed
    run starts from the metrics.jsonl already there."""

    def __init__(self, out: AnyPath, enabled: bool):
        self.out = out
        self._stage = None
        if enabled and is_url(out):
            self._tmp = tempfile.TemporaryDirectory(prefix="starling_metrics.")  # deleted with the writer
            self._stage = Path(self._tmp.name)
            if (out / "metrics.jsonl").is_file():
                copy_file(out / "metrics.jsonl", self._stage / "metrics.jsonl")
        local = self._stage or out
        self.history_path = local / "metrics.jsonl"
        self._tb = SummaryWriter(str(local / "tensorboard")) if enabled else None

    def train_row(self, row: dict) -> None:
        if self._tb is None:
            return
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(f"train/{key}", value, row["step"])
        with self.history_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def eval_metrics(self, metrics: dict, step: int) -> None:
        if self._tb is None:
            return
        for key, value in metrics.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        self._tb.add_scalar(f"eval/{key}/{sub}", v, step)
            elif isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"eval/{key}", value, step)

    def history(self) -> list[dict]:
        """Logged train rows by step; a resumed run rewrites steps after its checkpoint: the latest wins."""
        rows: dict[int, dict] = {}
        if self.history_path.is_file():
            for line in self.history_path.read_text().splitlines():
                row = json.loads(line)
                if not row.get("skipped"):
                    rows[row["step"]] = row
        return [rows[s] for s in sorted(rows)]

    def sync(self) -> None:
        """Copies the staged files to a URL output_dir (no-op for a local one)."""
        if self._stage is None:
            return
        self._tb.flush()
        self._copy_up()

    def _copy_up(self) -> None:
        for path in sorted(self._stage.rglob("*")):
            if path.is_file():
                target = self.out / str(path.relative_to(self._stage))
                target.parent.mkdir(parents=True, exist_ok=True)
                copy_file(path, target)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._stage is not None:
            self._copy_up()


class StepWindow:
    """Device metrics of the steps since the last log, fetched together (no host sync per step), with the
    throughput/MFU window and the non-finite policy (`train.skip_nonfinite`)."""

    def __init__(
        self, job: Job, writer: MetricsWriter, skip_nonfinite: int, peak_flops: float | None, num_devices: int
    ):
        self.job = job
        self.writer = writer
        self.skip_nonfinite = skip_nonfinite
        self.peak = peak_flops
        self.num_devices = num_devices
        self.pending: list[tuple[int, Any, list[int], int]] = []  # (step, device metrics, rows, length)
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self.last_good_checkpoint: int | None = None
        self._reset()

    def _reset(self) -> None:
        self.start, self.tokens, self.padded = time.perf_counter(), 0, 0

    def add(self, step: int, metrics, tokens: Tokens, rows: list[int]) -> None:
        real, padded, length = tokens
        self.pending.append((step, metrics, rows, length))
        self.tokens += real * jax.process_count()
        self.padded += padded * jax.process_count()

    def drain(self) -> dict | None:
        """Fetch pending metrics → the logged row (None if nothing is pending or every step was skipped)."""
        if not self.pending:
            return None
        fetched = jax.device_get([m for _, m, _, _ in self.pending])
        good = []
        for (step, _, rows, _), m in zip(self.pending, fetched):
            if bool(m["finite"]):
                self.skipped_in_a_row = 0
                good.append(m)
            else:
                self._non_finite(step, m, rows)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        last_step = self.pending[-1][0]
        lengths = [length for _, _, _, length in self.pending]
        row = None
        if good:
            row = {"step": last_step}
            for key, value in good[-1].items():
                if key == "finite" or key in self.job.hidden_metrics:
                    continue
                values = [float(m[key]) for m in good] if key in self.job.window_means else [float(value)]
                row[key] = float(np.mean(values))
            row["tokens_per_s"] = self.tokens / elapsed
            if self.peak:
                flops = self.padded * self.job.flops_per_token(int(np.mean(lengths)))
                row["mfu"] = flops / elapsed / (self.peak * self.num_devices)
            self.writer.train_row(row)
        self.pending.clear()
        self._reset()
        return row

    def _non_finite(self, step: int, m: dict, rows: list[int]) -> None:
        what = f"step {step}: loss={float(m['loss'])} grad_norm={float(m['grad_norm'])} is not finite"
        if self.skipped_in_a_row >= self.skip_nonfinite:
            hint = f"that update was not applied and nothing was checkpointed after step {self.last_good_checkpoint}. "
            if self.skip_nonfinite:
                hint = f"{self.skip_nonfinite} batch(es) in a row were skipped before it; " + hint
            raise TrainingError(
                f"{what}; {hint}Lower optim.learning_rate, check the data (rows {rows[:16]}) or "
                "set train.skip_nonfinite=N to skip such batches."
            )
        self.skipped_in_a_row += 1
        self.skipped_total += 1
        log.warning(
            "%s: batch skipped, no update applied (data rows %s; %d in a row, at most %d)",
            what,
            rows,
            self.skipped_in_a_row,
            self.skip_nonfinite,
        )
        self.writer.train_row(
            {"step": step, "skipped": True, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "rows": rows}
        )


def _progress(job: Job, total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=job.name, unit="step", dynamic_ncols=True)


def _due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


def _save(
    job: Job,
    ckpt: Checkpointer,
    window: StepWindow,
    step: int,
    state,
    frozen: dict,
    last_eval: dict,
    setup: JobSetup,
    force: bool = False,
) -> None:
    window.drain()  # a non-finite step raises here, before anything of it is saved
    if window.last_good_checkpoint == step:  # e.g. a SIGTERM right after the scheduled save of this step
        return
    meta = {
        **models_meta(setup.models),
        **job.meta(last_eval),
        "eval": last_eval,
        "run_config": config_lib.to_dict(job.cfg),
    }
    ckpt.save(step, state, setup.train_data.state(), meta, force=force, frozen=frozen or None)
    window.last_good_checkpoint = step
    window.writer.sync()


# Keys a resumed run may change: how long it runs, how often it logs, evaluates and saves, what it writes at the
# end (export.*), and how the same computation is laid out on its devices: mesh.* (an elastic resume on another
# topology) and the memory levers (last key component; results unchanged, tests/model/test_memory_levers.py), which
# such a resume may need. Any other change would silently continue the old run with a new meaning: refused.
RESUME_MAY_CHANGE = (
    "output_dir",
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_max_batches",
    "train.save_every",
    "train.keep_checkpoints",
    "train.async_checkpointing",
    "train.progress_bar",
    "train.peak_tflops_per_device",
    "export.",
    "mesh.",
)
RESUME_MAY_CHANGE_LEVERS = ("remat_policy", "mlp_chunks", "attention_impl", "attention_block")


def _flat(tree, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def has_checkpoint(out: AnyPath) -> bool:
    """True when `out/checkpoints` holds a complete step (Orbax renames a step folder into place when complete)."""
    folder = out / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def check_resume_config(cfg, out: AnyPath) -> None:
    """Refuses (one line) to resume the run in `out` with a config that differs from its `config.yaml` in a key
    outside `RESUME_MAY_CHANGE`, naming every changed key with both values. Keys only one side has (a config
    written by another version of starling_jax) are not compared."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file() or not has_checkpoint(out):
        return
    try:
        saved = _flat(OmegaConf.to_container(OmegaConf.create(saved_path.read_text())))
    except Exception as e:  # noqa: BLE001 - an unreadable file: say so, do not guess
        log.warning("%s: not compared with this run's config (%s)", saved_path, str(e).splitlines()[0])
        return
    # the current config through the same YAML round trip, so that equal values compare equal (tuples, floats)
    current = _flat(OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(OmegaConf.structured(cfg)))))

    def short(value) -> str:
        text = json.dumps(value, default=str)
        return text if len(text) <= 60 else text[:57] + "..."

    changed = [
        f"{k} ({short(saved[k])} → {short(current[k])})"
        for k in sorted(set(saved) & set(current))
        if saved[k] != current[k]
        and not k.startswith(RESUME_MAY_CHANGE)
        and k.rsplit(".", 1)[-1] not in RESUME_MAY_CHANGE_LEVERS
    ]
    if changed:
        raise ConfigError(
            f"{saved_path}: the run in output_dir={cfg.output_dir} would resume with a changed config: "
            f"{', '.join(changed)}; only train.steps, the log/eval/save cadence (train.*_every, "
            "train.eval_max_batches, train.keep_checkpoints), export.*, mesh.* and the memory levers "
            f"({', '.join(RESUME_MAY_CHANGE_LEVERS)}) may change on resume: revert the changes, or "
            "start a new run with another output_dir"
        )


def write_config(cfg, path: AnyPath) -> None:
    """`config.yaml`, replaced in one step on a local disk (written aside, then renamed over the old one)."""
    if is_url(path):
        config_lib.save_config(cfg, path)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    config_lib.save_config(cfg, tmp)
    os.replace(tmp, path)


def run(job: Job) -> dict[str, Any]:
    """Runs `job` to `train.steps` (or a preemption) → the JSON summary. See the module doc for the phases.

    `config.yaml` is written only once the job's set-up succeeded, so a run that fails before that leaves the
    previous run's config in `output_dir` as it was; resuming that run with a changed config is refused
    (`check_resume_config`)."""
    cfg = job.cfg
    out = as_path(cfg.output_dir, absolute=True)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={cfg.output_dir}: {out} is a file, not a folder; choose another output_dir")
    check_resume_config(cfg, out)
    is_main = jax.process_index() == 0
    lock = OutputLock(out, enabled=is_main)
    try:
        mesh = sharding.make_mesh(cfg.mesh)
        log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].device_kind)
        setup = job.setup(mesh)
        if is_main:
            write_config(cfg, out / "config.yaml")
        try:
            return _train(job, setup, out, mesh, is_main)
        finally:
            setup.close()
    finally:
        lock.release()


def _train(job: Job, setup: JobSetup, out: AnyPath, mesh, is_main: bool) -> dict[str, Any]:
    cfg, train = job.cfg, job.cfg.train
    # --- the train state (the one builder), then the job's programs, jitted once against its abstract form
    state, state_shardings = build_train_state(
        setup.params, setup.params_shardings, setup.optimizer.tx, mesh, cfg.seed, setup.extra_state
    )
    abstract_state = abstract_train_state(state, state_shardings)
    steps = job.steps(mesh, setup, abstract_state)
    frozen, train_data = setup.frozen, setup.train_data
    setup.params, setup.frozen = None, {}  # the state and `frozen` hold them now (the step donates the state)
    # --- checkpoint: resume from the latest complete one (each model by name)
    ckpt = Checkpointer(out / "checkpoints", max_to_keep=train.keep_checkpoints, async_save=train.async_checkpointing)
    resumed_from = ckpt.latest_step()
    last_eval: dict = {}
    meta = None
    if resumed_from is not None:
        abstract_frozen = {name: abstract_params(p, setup.frozen_shardings[name]) for name, p in frozen.items()}
        restored = ckpt.restore(
            abstract_state, resumed_from, abstract_frozen=abstract_frozen or None, models=setup.models
        )
        state, data_state, meta = restored[:3]
        if abstract_frozen:
            frozen = restored[3]
        train_data.restore(data_state)
        last_eval = meta.get("eval", {})
        log.info("resumed from step %d (data position %s)", resumed_from, data_state)
    job.start(state, frozen, meta if resumed_from is not None else None, steps)

    writer = MetricsWriter(out, enabled=is_main)
    window = StepWindow(job, writer, train.skip_nonfinite, hardware.peak_flops(train.peak_tflops_per_device), mesh.size)
    window.last_good_checkpoint = resumed_from
    preemption = Preemption()
    step = resumed_from or 0
    status = "completed"
    progress = _progress(job, train.steps, step, train.progress_bar and is_main)

    try:
        train_iter = iter(train_data)
        while step < train.steps:
            host_batch = next(train_iter)
            state, metrics, tokens = steps.train(state, frozen, host_batch)
            step += 1
            window.add(step, metrics, tokens, job.batch_rows(host_batch))
            if _due(step, train.log_every, train.steps):
                row = window.drain()
                if progress is not None and row:
                    progress.set_postfix(**job.progress(row))
            if progress is not None:
                progress.update(1)
            if _due(step, train.eval_every, train.steps):
                window.drain()
                last_eval = steps.evaluate(state, frozen, train.eval_max_batches)
                writer.eval_metrics(last_eval, step)
                log.info("step %d eval: %s", step, {k: v for k, v in last_eval.items() if not isinstance(v, dict)})
            if _due(step, train.save_every, train.steps):
                _save(job, ckpt, window, step, state, frozen, last_eval, setup)
            if preemption.check():
                _save(job, ckpt, window, step, state, frozen, last_eval, setup, force=True)
                status = "preempted"
                break
        window.drain()
        ckpt.wait()
    finally:
        preemption.restore()
        if progress is not None:
            progress.close()
        ckpt.close()
        writer.close()

    # --- export & summary
    hf_dir = None
    if status == "completed":
        if not last_eval:
            last_eval = steps.evaluate(state, frozen, train.eval_max_batches)
        if cfg.export.hf:
            hf_dir = job.export(state, frozen, last_eval, out / "hf")
        if cfg.export.plot and is_main:
            job.plot(writer.history(), last_eval, out / "summary.png")
    return {
        "status": status,
        "output_dir": str(out),
        "steps": step,
        "resumed_from": resumed_from,
        **job.summary(last_eval),
        "skipped_steps": window.skipped_total,
        "checkpoint_dir": str(out / "checkpoints"),
        "hf_export_dir": str(hf_dir) if hf_dir else None,
    }
