"""Device mesh and the one logical-axis rules table.

Modules name only *logical* axes (`Param(..., axes=("embed", "mlp"))`, `constrain(x, ("act_batch", ...))`);
`LOGICAL_RULES` maps them to the mesh axes `data`, `fsdp`, `tensor`. Changing the parallelism of a run means
changing mesh sizes in the config, never a module.

Mesh axes:
  dcn     data parallelism across TPU slices joined by the data-center network (`mesh.dcn` = number of slices;
          the axis exists only when > 1): parameters replicated over it, only gradients cross it
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3)
  tensor  Megatron-style tensor parallelism over heads and the MLP width (within a host / ICI)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from starling_jax.errors import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")  # within a slice (ICI); "dcn" goes in front when mesh.dcn > 1
DCN_AXIS = "dcn"
DATA_AXES = (DCN_AXIS, "data", "fsdp")  # every axis the batch is split over

# Logical axis → mesh axes. Parameters shard their model width over `fsdp` (each device holds 1/fsdp of every
# matrix, gathered just in time for the matmul) and heads / MLP width / vocabulary over `tensor`.
# Activations shard the batch over every data-parallel axis; their model width stays whole.
LOGICAL_RULES: dict[str, tuple[str, ...] | None] = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "mlp": ("tensor",),
    "norm": None,
    "layers": None,  # the stacked-layer axis when layers are scanned
    "score": None,  # the 1-wide output of the scalar head
    # activations
    "act_batch": DATA_AXES,
    "act_length": None,
    "act_embed": None,
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "act_answers": None,
    # a layer input saved for the backward (full remat): its length split over the tensor-parallel devices, which
    # would otherwise each keep the same copy of all layers' inputs (gathered back one layer at a time)
    "act_saved_length": ("tensor",),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh sizes within one slice; -1 means "all remaining devices" (at most one axis may be -1). `dcn`: the
    number of slices (multi-slice runs), an outer data-parallel axis; data × fsdp × tensor then count one slice."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn: int = 1

    def __post_init__(self):
        if self.dcn < 1:
            raise ConfigError(f"mesh.dcn={self.dcn}: the number of slices must be >= 1")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh: sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh: data×fsdp×tensor = {math.prod(sizes)} but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices (of all processes), with classic GSPMD (Auto) axes; with
    `cfg.dcn` > 1 a (dcn, data, fsdp, tensor) mesh whose `dcn` axis runs across slices (`slice_index`)."""
    devices = list(devices) if devices is not None else jax.devices()
    if cfg.dcn == 1:
        shape = mesh_shape(cfg, len(devices))
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    if len(devices) % cfg.dcn:
        raise ConfigError(f"mesh.dcn={cfg.dcn}: {len(devices)} devices do not split into {cfg.dcn} equal slices")
    ici = mesh_shape(cfg, len(devices) // cfg.dcn)
    axes = (DCN_AXIS,) + MESH_AXES
    slices = {getattr(d, "slice_index", None) for d in devices}
    if slices != {None}:  # real (or compile-only) TPU slices: ICI axes inside a slice, dcn across them
        if len(slices) != cfg.dcn:
            raise ConfigError(f"mesh.dcn={cfg.dcn} but the devices form {len(slices)} slice(s)")
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh((1,) + ici, (cfg.dcn, 1, 1, 1), devices)
    else:  # no slices (CPU/GPU): consecutive device blocks play the slices
        grid = np.asarray(devices, dtype=object).reshape((cfg.dcn,) + ici)
    return Mesh(grid, axes, axis_types=(AxisType.Auto,) * 4)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the data-parallel axes present in `mesh`."""
    return math.prod(mesh.shape.get(a, 1) for a in DATA_AXES)


def require_batch_multiple(mesh: Mesh, sizes: dict[str, int]) -> None:
    """A ConfigError naming the setting when a batch size (`{"data.batch_size": 4}`) does not split evenly over the
    mesh's data-parallel devices (the batch axis of every device array is sharded over them)."""
    dp = data_parallel_size(mesh)
    for key, size in sizes.items():
        if size % dp:
            axes = " × ".join(f"mesh.{a}={mesh.shape[a]}" for a in DATA_AXES if a in mesh.shape)
            raise ConfigError(f"{key}={size} is not a multiple of the mesh's {dp} data-parallel devices ({axes})")


def packed_row_multiple(mesh: Mesh) -> int:
    """What each host's count of packed rows must be a multiple of (per micro-batch): the global rows of a batch,
    processes × rows per host, then split evenly over the `data_parallel_size` devices."""
    dp = data_parallel_size(mesh)
    return dp // math.gcd(dp, jax.process_count())


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: dict[str, Any] = LOGICAL_RULES,
) -> P:
    """Maps logical axis names to a PartitionSpec.

    With `shape` and `mesh`, a dimension that the mapped mesh axes do not divide is replicated instead (e.g. 4 KV
    heads over tensor=8); the fallback is logged, and `assert_sharded` catches a layout that went fully replicated.
    """
    spec, used = [], set()
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_RULES")
        mesh_axes = tuple(a for a in (rules[name] or ()) if a not in used)
        if mesh is not None:  # axes the mesh lacks (dcn on one slice) or of size 1 shard nothing
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape.get(a, 1) > 1)
            if shape is not None and mesh_axes:
                size = math.prod(mesh.shape[a] for a in mesh_axes)
                if shape[i] % size:
                    log.info(
                        "dimension %s (%d) not divisible by mesh axes %s (%d): replicated",
                        name,
                        shape[i],
                        mesh_axes,
                        size,
                    )
                    mesh_axes = ()
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def variable_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axes of a variable; a leading extra dimension (scanned layers) is the `layers` axis."""
    axes = tuple(var.get_metadata().get("axes", ()))
    ndim = len(var.get_value().shape)
    if ndim == len(axes) + 1:
        axes = ("layers",) + axes
    if ndim != len(axes):
        raise ValueError(f"variable of shape {var.get_value().shape} has logical axes {axes}")
    return axes


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedSharding for every variable of an (abstract) model state, from its logical axes.

    The result has the state's exact structure (each Variable now holds a NamedSharding), so it serves as
    `in_shardings`/`out_shardings` and as the params tree of `optax.tree_map_params`.
    """
    return jax.tree.map(
        lambda v: v.replace(value=NamedSharding(mesh, logical_to_spec(variable_axes(v), v.get_value().shape, mesh))),
        state,
        is_leaf=_is_variable,
    )


def state_specs(state: nnx.State, mesh: Mesh) -> nnx.State:
    return jax.tree.map(
        lambda v: logical_to_spec(variable_axes(v), v.get_value().shape, mesh), state, is_leaf=_is_variable
    )


# ------------------------------------------------------------------ activation constraints
class _ActiveMesh(threading.local):
    mesh: Mesh | None = None


_active = _ActiveMesh()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None):
    """Within this context (around tracing), `constrain` pins activations to the mesh; outside it is a no-op."""
    previous = _active.mesh
    _active.mesh = mesh
    try:
        yield
    finally:
        _active.mesh = previous


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_sharding` context (None outside one)."""
    return _active.mesh


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    mesh = _active.mesh
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a host batch array [B, ...]: B over every data-parallel axis."""
    return NamedSharding(mesh, logical_to_spec(("act_batch",) + (None,) * (ndim - 1), None, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def assert_sharded(state: nnx.State, mesh: Mesh, min_fraction: float = 0.9) -> None:
    """Asserts that most parameter bytes are sharded when the mesh has more than one model-parallel device.

    Catches a rules table that silently replicates a 7B model on every chip (the OOM users hit on pods).
    """
    model_parallel = mesh.shape["fsdp"] * mesh.shape["tensor"]
    if model_parallel == 1:
        return
    total = sharded = 0
    for v in jax.tree.leaves(state, is_leaf=_is_variable):
        size = int(np.prod(v.get_value().shape))
        total += size
        spec = logical_to_spec(variable_axes(v), v.get_value().shape, mesh)
        if any(s is not None for s in spec):
            sharded += size
    if total and sharded / total < min_fraction:
        raise AssertionError(f"only {sharded / total:.1%} of parameters are sharded over a mesh of {dict(mesh.shape)}")
