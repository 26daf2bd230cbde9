"""Orbax checkpoints: the train state, the data-iterator position and run metadata, saved together.

Layout: `<dir>/<step>/{state,data,meta}` (+ `frozen` when the job holds frozen models: `{name: params}`).
Orbax writes each step into a temporary folder and renames it when
complete, so a run killed mid-save (SIGKILL, preemption) leaves no half checkpoint that `latest_step` would pick.
`meta` holds the model architecture, the role and the tokenizer, so that `export_hf`, `score` and a resume can
check a checkpoint before reading tensors. `meta["models"]` names every model of the job (`{name: {role,
trainable, architecture, model}}`); `role`/`model`/`architecture` at the top level describe the first trainable one
(what `export_hf` exports). A resume restores each model by name and refuses a missing or extra one.
The folder may be a local path or a URL (`gs://bucket/run/checkpoints`): Orbax writes both (see `paths.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from starling_jax.errors import CheckpointError
from starling_jax.model.config import ModelConfig
from starling_jax.model.create import abstract_model
from starling_jax.parallel import sharding
from starling_jax.paths import as_path


class Checkpointer:
    def __init__(self, directory: str | Path, max_to_keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = as_path(directory, absolute=True)
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: checkpoint folder not found")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only, enable_async_checkpointing=async_save, read_only=read_only
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state: Any, data_state: dict, meta: dict, force: bool = False, frozen: dict | None = None
    ) -> bool:
        items = dict(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)
        )
        if frozen:
            items["frozen"] = ocp.args.StandardSave(frozen)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def read_meta(self, step: int | None = None) -> dict:
        step = self._step(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(
        self,
        abstract_state: Any,
        step: int | None = None,
        abstract_frozen: dict | None = None,
        models: list | None = None,
    ) -> tuple[Any, dict, dict] | tuple[Any, dict, dict, dict]:
        """→ (state, data_state, meta), + frozen `{name: params}` when `abstract_frozen` is given.

        `abstract_*` (ShapeDtypeStructs with shardings) fix the layout. With `models` (the job's `ModelEntry`s) the
        checkpoint's named models are checked first: a missing or extra model, another role or architecture is a
        one-line `CheckpointError`.
        """
        step = self._step(step)
        where = f"{self.directory}/{step}"
        if models is not None:
            check_models(self.read_meta(step), models, where)
        items = dict(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
        )
        if abstract_frozen:
            items["frozen"] = ocp.args.StandardRestore(abstract_frozen)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{where}: cannot restore the train state ({str(e)[:300]})") from None
        out = restored["state"], dict(restored["data"]), dict(restored["meta"])
        return (*out, dict(restored["frozen"])) if abstract_frozen is not None else out

    def restore_params(
        self, abstract_params: Any, step: int | None = None, item: str = "state", name: str | None = None
    ) -> Any:
        """Only one model's parameters (no optimizer state): for export, scoring and reference/critic
        initialization. `item="state"`: the trainable model (`state["params"]`); `"frozen"`: frozen model `name`."""
        step = self._step(step)
        key = "params" if item == "state" else name
        target = {key: abstract_params}
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        item: ocp.args.PyTreeRestore(
                            target,
                            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                            partial_restore=True,
                        )
                    }
                ),
            )
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore the parameters ({str(e)[:300]})") from None
        return restored[item][key]

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint in this folder")
        if step not in self.manager.all_steps():
            raise CheckpointError(f"{self.directory}: no checkpoint for step {step} (have {self.manager.all_steps()})")
        return step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_architecture(meta: dict, expected: dict, where: str) -> None:
    """A checkpoint from another model size or family is refused with the first differing field."""
    found = meta.get("architecture", {})
    for key, value in expected.items():
        if found.get(key) != value:
            raise CheckpointError(
                f"{where}: checkpoint holds a model with {key}={found.get(key)!r} but the config asks for "
                f"{key}={value!r} (another model size? use a new output_dir or fix model.*)"
            )


def models_meta(models: list) -> dict:
    """`meta` entries naming every model (`ModelEntry`s); the first trainable one is the top-level `role`/`model`."""
    primary = next((m for m in models if m.trainable), models[0])
    return {
        "models": {m.name: m.meta() for m in models},
        "role": primary.role,
        "architecture": primary.config.architecture_dict(),
        "model": primary.meta()["model"],
    }


def check_models(meta: dict, models: list, where: str) -> None:
    """The checkpoint holds exactly the job's models, by name, each with the same role, trainability and
    architecture; otherwise a one-line error naming the first difference."""
    found = meta.get("models")
    if found is None:  # a checkpoint of one model written before models were named
        primary = next((m for m in models if m.trainable), models[0])
        found = {
            primary.name: {"role": meta.get("role"), "trainable": True, "architecture": meta.get("architecture", {})}
        }
    wanted = {m.name: m for m in models}
    missing = sorted(set(wanted) - set(found))
    extra = sorted(set(found) - set(wanted))
    if missing:
        raise CheckpointError(
            f"{where}: checkpoint has no model named {missing[0]!r} (it holds {sorted(found)}; "
            f"this job needs {sorted(wanted)})"
        )
    if extra:
        raise CheckpointError(
            f"{where}: checkpoint holds a model {extra[0]!r} this job does not have (it holds "
            f"{sorted(found)}; this job needs {sorted(wanted)})"
        )
    for name, m in wanted.items():
        got = found[name]
        if got.get("role") != m.role:
            raise CheckpointError(
                f"{where}: model {name!r} has role {got.get('role')!r} in the checkpoint but {m.role!r} in this job"
            )
        if bool(got.get("trainable", True)) != m.trainable:
            raise CheckpointError(
                f"{where}: model {name!r} is {'trainable' if got.get('trainable') else 'frozen'} "
                f"in the checkpoint but not in this job"
            )
        check_architecture(
            {"architecture": got.get("architecture", {})}, m.config.architecture_dict(), f"{where} (model {name!r})"
        )


def find_checkpoint_dir(path: str | Path) -> tuple[Path, int | None]:
    """Accepts a run's output folder, its `checkpoints/` folder or one step folder → (manager dir, step)."""
    path = as_path(path, absolute=True)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit() and (path / "state").exists():
        return path.parent, int(path.name)
    return path, None


def load_model(path: str | Path, mesh, step: int | None = None, name: str | None = None):
    """A trained model from a checkpoint folder → (meta, model cfg, graphdef, params sharded on `mesh`).

    `name`: which of the checkpoint's named models (default: the first trainable one, `meta["role"]`); a frozen
    model is read from the `frozen` item."""
    directory, found_step = find_checkpoint_dir(path)
    ckpt = Checkpointer(directory, read_only=True)
    step = step if step is not None else found_step
    meta = ckpt.read_meta(step)
    for key in ("role", "model"):
        if key not in meta:
            raise CheckpointError(f"{directory}: checkpoint metadata has no {key!r} (not a starling_jax checkpoint?)")
    entry = {"role": meta["role"], "model": meta["model"], "trainable": True}
    if name is not None:
        models = meta.get("models", {})
        if name not in models:
            raise CheckpointError(f"{directory}: checkpoint has no model named {name!r} (it holds {sorted(models)})")
        entry = models[name]
    model_cfg = ModelConfig(**entry["model"])
    graphdef, abstract = abstract_model(model_cfg, entry["role"])
    shardings = sharding.state_shardings(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = ckpt.restore_params(target, step, item="state" if entry.get("trainable", True) else "frozen", name=name)
    meta = {**meta, "role": entry["role"], "model": entry["model"]}
    ckpt.close()
    return meta, model_cfg, graphdef, params
