"""Orbax checkpoints: the train state, the data-iterator position and run metadata, saved together.

Layout: `<dir>/<step>/{state,data,meta}`. Orbax writes each step into a temporary folder and renames it when
complete, so a run killed mid-save (SIGKILL, preemption) leaves no half checkpoint that `latest_step` would pick.
`meta` holds the model architecture, the role and the tokenizer, so that `export_hf`, `score` and a resume can
check a checkpoint before reading tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from starling_jax.errors import CheckpointError


class Checkpointer:
    def __init__(self, directory: str | Path, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: checkpoint folder not found")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                               enable_async_checkpointing=async_save, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, meta: dict, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=force)

    def read_meta(self, step: int | None = None) -> dict:
        step = self._step(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """→ (state, data_state, meta); `abstract_state` (ShapeDtypeStructs with shardings) fixes the layout."""
        step = self._step(step)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore the train state ({str(e)[:300]})") from None
        return restored["state"], dict(restored["data"]), dict(restored["meta"])

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Only the parameters (no optimizer state): for export, scoring and reference/critic initialization."""
        step = self._step(step)
        target = {"params": abstract_params}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore the parameters ({str(e)[:300]})") from None
        return restored["state"]["params"]

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
                f"{key}={value!r} (another model size? use a new output_dir or fix model.*)")


def find_checkpoint_dir(path: str | Path) -> tuple[Path, int | None]:
    """Accepts a run's output folder, its `checkpoints/` folder or one step folder → (manager dir, step)."""
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit() and (path / "state").exists():
        return path.parent, int(path.name)
    return path, None


def load_model(path: str | Path, mesh, step: int | None = None):
    """A trained model from a checkpoint folder → (meta, model cfg, graphdef, params sharded on `mesh`)."""
    import jax

    from starling_jax.model.config import ModelConfig
    from starling_jax.model.create import abstract_model
    from starling_jax.parallel import sharding

    directory, found_step = find_checkpoint_dir(path)
    ckpt = Checkpointer(directory, read_only=True)
    step = step if step is not None else found_step
    meta = ckpt.read_meta(step)
    for key in ("role", "model"):
        if key not in meta:
            raise CheckpointError(f"{directory}: checkpoint metadata has no {key!r} (not a starling_jax checkpoint?)")
    model_cfg = ModelConfig(**meta["model"])
    graphdef, abstract = abstract_model(model_cfg, meta["role"])
    shardings = sharding.state_shardings(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = ckpt.restore_params(target, step)
    ckpt.close()
    return meta, model_cfg, graphdef, params
