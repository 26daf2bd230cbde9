"""Ahead-of-time compile of a run's programs for a TPU topology, from a CPU host: the reward-model train step, or
every program of a PPO/APA iteration with all its roles.

    python -m starling_jax.aot CONFIG.yaml [key=value ...] --topology v5p-32 [--num-slices S] [--num-layers N]
        [--hbm-gib G] [--job rm|ppo] [--programs rollout,score,experience,update] [--json]

PPO/APA (a config with `policy`, `reward_model`, `algorithm`, `rollout`, ...; or `--job ppo`): the architectures
come from `policy` / `reward_model` (a folder's config.json or the built-in table below; no weights are read), the
abstract RL set from `rl/abstract.py`. Each program (sampler with its KV cache, reward-model scoring, experience
forward, donated update) is compiled; its memory per chip is its own (arguments + outputs − aliased + temporaries +
code) plus the roles resident beside it (actor, critic, AdamW state, reference, reward model stay in HBM all run).
`per_chip_bytes` in the JSON is the peak over the programs, `programs` the breakdown, `roles_bytes` each role's
resident bytes per chip; `fits` holds when every program fits. `--num-layers N` shortens policy and reward model.

Compiles the very step `train_rm` runs (`rm_step.jit_train_step`: the config's mesh, micro-batches, remat, scan
and dtypes) for the topology's devices with fully abstract inputs — nothing is allocated — and reports per-chip
memory (`compiled.memory_analysis()`) against the chip's HBM, the compiler's FLOPs and an estimated step time.
Exit status: 0 fits, 1 does not fit, 2 user error. The last printed line is a one-line JSON summary.

Topologies: `cpu` (this process's own devices; no libtpu needed), Cloud TPU names `v4-N`, `v5p-N` (N = TensorCores,
2 per chip), `v5e-N`, `v6e-N` (N = chips), or a raw libtpu topology such as `v5e:4x8` / `v5:2x2x4`.
TPU topologies need libtpu: `pip install "starling_jax[tpu]"` (= `jax[tpu]==0.10.2`), best in a separate
virtualenv; JAX_PLATFORMS=cpu (set here by default) keeps libtpu from looking for a local TPU.
`init_from` gives the architecture: a local folder's config.json, else the built-in table of known Hub configs
(the Hub is consulted only when neither has it). `--num-layers N` compiles a shallower model (smoke runs).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from starling_jax import cli
from starling_jax.errors import ConfigError
from starling_jax.parallel import hardware

GIB = 1024**3


# ------------------------------------------------------------------------------------------------ pieces
def compile_only_tpu_env(topology: str) -> None:
    """What libtpu reads at start-up, set for a compile-only run on a host without TPUs (kept when already set,
    e.g. on a TPU VM). Without them libtpu looks for this host's accelerator type and worker hostnames in the GCE
    metadata and prints "could not determine TPU accelerator type" and `INVALID_ARGUMENT ... TPU_WORKER_HOSTNAMES`.
    The compile-only topology itself comes from its name (`topology_devices`), not from these."""
    family = re.match(r"(v4|v5p|v5e|v6e|v5|v\d[a-z]*)", topology)
    cloud = {"v5e": "v5litepod", "v5": "v5p"}.get(family.group(1), family.group(1)) if family else "v5litepod"
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{cloud}-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # No TPU is opened: several compile-only processes (e.g. parallel checks) need not take libtpu's lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(topology: str, num_slices: int = 1) -> tuple[list, str]:
    """→ (devices, libtpu topology name); `cpu` → this process's devices. `num_slices` > 1: that many copies of
    the topology joined over DCN (devices carry `slice_index`)."""
    import jax

    if num_slices < 1:
        raise ConfigError(f"--num-slices {num_slices}: must be >= 1")
    if topology == "cpu":
        if num_slices > 1:
            raise ConfigError("--num-slices needs a TPU topology (on cpu, set mesh.dcn to split the devices)")
        return jax.devices(), "cpu"
    name = topology
    match = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", topology)
    if match:
        prefix, per_chip, shapes = hardware.TPU_FAMILIES[match.group(1)]
        chips = int(match.group(2)) // per_chip
        if chips not in shapes:
            sizes = ",".join(str(n * per_chip) for n in sorted(shapes))
            raise ConfigError(
                f"--topology {topology}: unknown size; known: {match.group(1)}-{{{sizes}}} "
                f"(or give a libtpu topology such as {prefix}:{shapes[max(shapes)]})"
            )
        name = f"{prefix}:{shapes[chips]}"
    elif not re.fullmatch(r"v\d[a-z]*:\d+(x\d+){1,2}", topology):
        raise ConfigError(
            f"--topology {topology!r}: expected cpu, v4-N, v5p-N, v5e-N, v6e-N or a libtpu topology such as v5e:4x8"
        )
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(
            f"--topology {topology} needs libtpu to compile for TPU on this host: "
            'pip install "starling_jax[tpu]" (or "jax[tpu]==0.10.2"), best in a separate virtualenv'
        )
    from jax.experimental import topologies

    compile_only_tpu_env(name)
    try:
        kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
        return list(topologies.get_topology_desc(name, "tpu", **kwargs).devices), name
    except Exception as e:  # libtpu's messages are long; keep the first line
        raise ConfigError(
            f"--topology {topology} ({name}): libtpu could not build it: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def hbm_bytes(device_kind: str, num_devices: int, override_gib: float | None) -> tuple[int, str]:
    """→ (capacity per chip in bytes, where it came from)."""
    if override_gib is not None:
        return int(override_gib * GIB), "--hbm-gib"
    known = hardware.hbm_capacity(device_kind, num_devices)
    if known is not None:
        return known
    raise ConfigError(f"device kind {device_kind!r}: HBM capacity unknown; pass --hbm-gib")


def resolve_model_config(cfg, num_layers: int | None):
    """The architecture the run would train (init_from's config.json, else `model`), with runtime fields."""
    from starling_jax.model.architectures import architecture  # JAX: not at import (`aot --help` stays instant)
    from starling_jax.train.job import model_runtime

    model_cfg = cfg.model_config  # `model` with the `runtime:` fields
    if cfg.init_from:
        model_cfg = architecture(cfg.init_from, "init_from", **model_runtime(model_cfg))
    return _with_layers(model_cfg, num_layers)


def _with_layers(model_cfg, num_layers: int | None):
    if num_layers is None:
        return model_cfg
    if num_layers < 1:
        raise ConfigError(f"--num-layers {num_layers}: must be >= 1")
    return model_cfg.replace(num_hidden_layers=num_layers)


def sharded_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the most loaded device)."""
    import jax
    import numpy as np

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


_OOM = re.compile(r"RESOURCE_EXHAUSTED: Ran out of memory")
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _oom_bytes(message: str, what: str) -> int | None:
    """`... HLO temporaries (29.06G) exceeds available HBM (15.75G)` → bytes of `what`."""
    m = re.search(re.escape(what) + r" \(([\d.]+)([KMGT]?)i?B?\)", message)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


# ------------------------------------------------------------------------------------------------ main
def _compile(jitted, *args) -> tuple[Any, str | None, float, float, int]:
    """→ (compiled or None when the compiler refused for memory, its OOM message, lower s, compile s, Pallas TPU
    kernel calls in the lowered program: > 0 when splash attention is in it)."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    kernel_calls = lowered.as_text().count("tpu_custom_call")
    t1 = time.perf_counter()
    try:
        compiled, oom = lowered.compile(), None
    except Exception as e:  # the TPU compiler refuses a program whose temporaries exceed HBM
        if not _OOM.search(str(e)):
            raise
        compiled, oom = None, str(e).splitlines()[0]
    return compiled, oom, t1 - t0, time.perf_counter() - t1, kernel_calls


def _memory(compiled, oom: str | None, args, donated) -> tuple[dict, str, int | None]:
    """Memory per chip → (parts, source, compiler's HBM figure): live arguments + outputs not aliased to donated
    arguments + scratch + code."""
    if compiled is not None:
        mem = compiled.memory_analysis()
        parts = {
            "argument": mem.argument_size_in_bytes,
            "output": mem.output_size_in_bytes,
            "temp": mem.temp_size_in_bytes,
            "generated_code": mem.generated_code_size_in_bytes,
            "alias": mem.alias_size_in_bytes,
            # host RAM, not HBM (not in the total): what `remat_policy=full_offload` moves off the chip
            "host_temp": mem.host_temp_size_in_bytes,
        }
        return parts, "compiled.memory_analysis()", None
    # out of memory: temporaries from the compiler's message, arguments from the shardings
    donated_bytes = sharded_bytes(donated) if donated is not None else 0
    parts = {
        "argument": sharded_bytes(args),
        "output": donated_bytes,
        "alias": donated_bytes,
        "generated_code": 0,
        "temp": _oom_bytes(oom, "HLO temporaries") or 0,
        "host_temp": 0,
    }
    return (
        parts,
        "compiler refused: out of memory; temporaries from its message, arguments from shardings",
        _oom_bytes(oom, "available HBM"),
    )


def _total(parts: dict) -> int:
    return parts["argument"] + parts["output"] - parts["alias"] + parts["temp"] + parts["generated_code"]


def _topology_mesh(cfg, topology: str, num_slices: int, hbm_gib: float | None):
    """The topology's devices and the config's mesh over them (the slices are the dcn axis) → (cfg with mesh.dcn
    set, devices, topology name, mesh, per-chip capacity, where the capacity comes from)."""
    from starling_jax.parallel import sharding

    devices, topology_name = topology_devices(topology, num_slices)
    if num_slices > 1 and cfg.mesh.dcn != num_slices:
        if cfg.mesh.dcn != 1:
            raise ConfigError(f"mesh.dcn={cfg.mesh.dcn} but --num-slices {num_slices}: they must agree")
        cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, dcn=num_slices))
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    capacity, capacity_source = hbm_bytes(devices[0].device_kind, len(devices), hbm_gib)
    return cfg, devices, topology_name, mesh, capacity, capacity_source


def compile_report(
    cfg,
    topology: str,
    num_layers: int | None = None,
    hbm_gib: float | None = None,
    mfu: float = 0.4,
    num_slices: int = 1,
    job=None,
) -> dict[str, Any]:
    """Compiles the job's train step (and its eval step) for `topology` (`num_slices` slices over DCN) → the
    report (see module doc). `job`: a `train.job.Job` for `cfg` (default: the reward-model job)."""
    from starling_jax.model import attention
    from starling_jax.parallel import sharding
    from starling_jax.train.rm_job import RMJob

    # --- devices & mesh
    cfg, devices, topology_name, mesh, capacity, capacity_source = _topology_mesh(cfg, topology, num_slices, hbm_gib)
    kind = devices[0].device_kind

    # --- the job's abstract state, batch and jitted step (nothing is allocated)
    model_cfg = resolve_model_config(cfg, num_layers)
    job = job or RMJob(cfg)
    state, batch, step_fn = job.abstract_inputs(mesh, model_cfg)
    data_parallel = sharding.data_parallel_size(mesh)
    micro_rows = cfg.data.batch_size // cfg.train.micro_batches
    warnings = []
    if micro_rows % data_parallel:
        warnings.append(
            f"each micro-batch holds {micro_rows} prompts, not a multiple of the {data_parallel} "
            "data-parallel devices: activations fall back to replicated (wasted compute and memory); "
            "choose data.batch_size / train.micro_batches divisible by it"
        )

    # --- the train step, lowered and compiled for the topology
    compiled, oom, lower_s, compile_s, _ = _compile(step_fn, state, batch)
    parts, memory_source, compiler_hbm = _memory(compiled, oom, (state, batch), state)
    if oom:
        warnings.append(oom)
    total = _total(parts)
    fits = compiled is not None and total <= capacity

    # --- the eval step (params only, the eval batch): it must fit where training fits
    eval_report = None
    eval_inputs = job.abstract_eval_inputs(mesh, model_cfg)
    if eval_inputs is not None:
        params, eval_batch, eval_fn = eval_inputs
        eval_compiled, eval_oom, _, eval_compile_s, _ = _compile(eval_fn, params, eval_batch)
        eval_parts, _, _ = _memory(eval_compiled, eval_oom, (params, eval_batch), None)
        eval_total = _total(eval_parts)
        eval_fits = eval_compiled is not None and eval_total <= capacity
        eval_report = {
            "per_chip_bytes": eval_total,
            "per_chip_gib": round(eval_total / GIB, 3),
            "memory_bytes": eval_parts,
            "fits": eval_fits,
            "compile_s": round(eval_compile_s, 2),
            "batch": list(eval_batch["tokens"].shape),
        }
        if eval_oom:
            warnings.append(f"eval step: {eval_oom}")
        fits = fits and eval_fits

    # --- FLOPs: the compiler's count (per chip; a scanned loop body is counted once) and the model's
    length = batch["tokens"].shape[-1]
    tokens = math.prod(batch["tokens"].shape)
    model_flops = model_cfg.flops_per_token(length) * tokens
    peak = hardware.peak_flops(cfg.train.peak_tflops_per_device, kind)
    est_step_s = model_flops / (mfu * peak * len(devices)) if peak else None
    return {
        "status": "completed",
        "topology": topology,
        "topology_name": topology_name,
        "num_slices": num_slices,
        "device_kind": kind,
        "num_chips": len(devices),
        "mesh": dict(mesh.shape),
        "model_type": model_cfg.model_type,
        "num_layers": model_cfg.num_hidden_layers,
        "num_params": model_cfg.num_params(head="score"),
        "param_dtype": model_cfg.param_dtype,
        "dtype": model_cfg.dtype,
        "remat_policy": model_cfg.remat_policy,
        "mlp_chunks": model_cfg.mlp_chunks,
        "scan_layers": model_cfg.scan_layers,
        "attention_impl": attention.resolve(model_cfg.attention_impl, devices[0].platform),
        "batch": list(batch["tokens"].shape),
        "micro_batches": cfg.train.micro_batches,
        "memory_bytes": parts,
        "memory_source": memory_source,
        "per_chip_bytes": total,
        "per_chip_gib": round(total / GIB, 3),
        "hbm_bytes": capacity,
        "hbm_gib": round(capacity / GIB, 3),
        "hbm_source": capacity_source,
        "compiler_hbm_bytes": compiler_hbm,
        "fits": fits,
        "compiled": compiled is not None,
        "eval": eval_report,
        "lower_s": round(lower_s, 2),
        "compile_s": round(compile_s, 2),
        "compiler_flops_per_chip": _cost_flops(compiled) if compiled is not None else None,
        "model_flops_per_step": model_flops,
        "tokens_per_step": tokens,
        "peak_flops_per_chip": peak,
        "assumed_mfu": mfu,
        "estimated_step_s": round(est_step_s, 3) if est_step_s else None,
        "estimated_tokens_per_s": round(tokens / est_step_s) if est_step_s else None,
        "warnings": warnings,
    }


def _role_bytes(rl) -> dict[str, int]:
    """Per-chip bytes of each resident role of the RL set, from the shardings."""
    params = rl.state["params"]
    models = {name: sharded_bytes(params[name]) for name in ("actor", "critic") if name in params}  # grpo: no critic
    return {
        **models,
        "optimizer": sharded_bytes(rl.state) - sum(models.values()),
        "reference": sharded_bytes(rl.frozen["reference"]),
        "reward": sharded_bytes(rl.frozen["reward"]),
    }


RL_PROGRAMS = ("rollout", "score", "experience", "update", "eval_rollout", "eval_score", "eval_experience")


def compile_rl_report(
    cfg,
    topology: str,
    num_layers: int | None = None,
    hbm_gib: float | None = None,
    num_slices: int = 1,
    programs: str | None = None,
) -> dict[str, Any]:
    """Compiles every program of one PPO/APA/GRPO/RLOO iteration (`rl/abstract.py`; grpo / rloo: no critic) for
    `topology` → the report: per program
    its own memory (`compiled.memory_analysis()`) plus the roles resident beside it (actor, critic, optimizer state,
    reference, reward model: they stay in HBM for the whole run), and `per_chip_bytes` = the peak over the
    programs."""
    from starling_jax.model import attention
    from starling_jax.model.architectures import architecture
    from starling_jax.parallel import sharding
    from starling_jax.rl.job import PPOJob

    chosen = RL_PROGRAMS if not programs else tuple(p.strip() for p in programs.split(","))
    if unknown := [p for p in chosen if p not in RL_PROGRAMS]:
        raise ConfigError(f"--programs: unknown {unknown}; choose from {','.join(RL_PROGRAMS)}")
    cfg, devices, topology_name, mesh, capacity, capacity_source = _topology_mesh(cfg, topology, num_slices, hbm_gib)
    kind = devices[0].device_kind
    models = {
        "policy": _with_layers(architecture(cfg.policy, "policy"), num_layers),
        "reward": _with_layers(architecture(cfg.reward_model, "reward_model"), num_layers),
    }
    if cfg.num_layers_unfrozen > models["policy"].num_hidden_layers:
        raise ConfigError(
            f"num_layers_unfrozen={cfg.num_layers_unfrozen} exceeds the policy's "
            f"{models['policy'].num_hidden_layers} layers (lower --num-layers less)"
        )
    dp = sharding.data_parallel_size(mesh)
    warnings = []
    for key, rows in (
        ("rollout.batch_size", cfg.rollout.batch_size),
        ("rollout.minibatch_size", cfg.rollout.minibatch_size),
    ):
        if rows % dp:  # as train_ppo refuses it: its rows are sharded over the data-parallel devices
            raise ConfigError(
                f"{key}={rows} is not a multiple of the mesh's {dp} data-parallel devices on "
                f"{topology}; raise it, or give mesh.tensor > 1 (e.g. mesh.fsdp={dp // 2} "
                "mesh.tensor=2)"
            )
    job = PPOJob(cfg)
    job.abstract_inputs(mesh, models)
    rl = job.abstract_set
    roles = _role_bytes(rl)
    resident = sum(roles.values())
    in_role = {"state": ("actor", "critic", "optimizer")}
    programs = {}
    for prog in (p for p in rl.programs if p.name in chosen):
        compiled, oom, lower_s, compile_s, kernel_calls = _compile(prog.fn, *prog.args)
        parts, source, _ = _memory(compiled, oom, prog.args, prog.donated)
        passed = {r for role in prog.roles for r in in_role.get(role, (role,)) if r in roles}
        beside = resident - sum(roles[r] for r in passed)
        own = _total(parts)
        total = own + beside
        if oom:
            warnings.append(f"{prog.name}: {oom}")
        programs[prog.name] = {
            "per_chip_bytes": total,
            "per_chip_gib": round(total / GIB, 3),
            "program_bytes": own,
            "resident_beside_bytes": beside,
            "memory_bytes": parts,
            "memory_source": source,
            "compiled": compiled is not None,
            "fits": compiled is not None and total <= capacity,
            "rows": prog.rows,
            "length": prog.length,
            "kernel_calls": kernel_calls,
            "lower_s": round(lower_s, 2),
            "compile_s": round(compile_s, 2),
        }
    peak_name = max(programs, key=lambda k: programs[k]["per_chip_bytes"])
    peak = programs[peak_name]["per_chip_bytes"]
    mc = rl.models
    return {
        "status": "completed",
        "job": "train_ppo",
        "algorithm": cfg.algorithm,
        "topology": topology,
        "topology_name": topology_name,
        "num_slices": num_slices,
        "device_kind": kind,
        "num_chips": len(devices),
        "mesh": dict(mesh.shape),
        "models": {
            name: {
                "model_type": m.model_type,
                "num_layers": m.num_hidden_layers,
                "param_dtype": m.param_dtype,
                "num_params": m.num_params(head="lm" if name == "actor" else "score"),
            }
            for name, m in mc.items()
        },
        "num_layers_unfrozen": cfg.num_layers_unfrozen,
        "dtype": mc["actor"].dtype,
        "remat_policy": mc["actor"].remat_policy,
        "mlp_chunks": mc["actor"].mlp_chunks,
        "scan_layers": mc["actor"].scan_layers,
        # what `auto` resolved to for this topology's mesh (every role, every program: one runtime section)
        "attention_impl": attention.resolve(mc["actor"].attention_impl, devices[0].platform),
        "roles_bytes": roles,
        "resident_bytes": resident,
        "resident_gib": round(resident / GIB, 3),
        "programs": programs,
        "peak_program": peak_name,
        "per_chip_bytes": peak,
        "per_chip_gib": round(peak / GIB, 3),
        "hbm_bytes": capacity,
        "hbm_gib": round(capacity / GIB, 3),
        "hbm_source": capacity_source,
        "fits": all(p["fits"] for p in programs.values()),
        "compile_s": round(sum(p["compile_s"] for p in programs.values()), 2),
        "warnings": warnings,
    }


def format_rl_report(r: dict[str, Any]) -> str:
    gib = lambda b: f"{b / GIB:8.3f} GiB"
    slices = f" × {r['num_slices']} slices" if r.get("num_slices", 1) > 1 else ""
    lines = [
        (
            f"topology {r['topology']}{slices} ({r['topology_name']}): {r['num_chips']} × {r['device_kind']}, "
            f"mesh {r['mesh']}"
        ),
        f"{r['algorithm']}: "
        + ", ".join(
            f"{k} {m['model_type']} {m['num_layers']} layers {m['num_params'] / 1e9:.2f}B {m['param_dtype']}"
            for k, m in r["models"].items()
        )
        + f"; num_layers_unfrozen {r['num_layers_unfrozen']}, compute {r['dtype']}, remat {r['remat_policy']}, "
        f"attention {r.get('attention_impl', 'einsum')}",
        "resident per chip (all roles, for the whole run):",
    ]
    lines += [f"  {name:<15} {gib(b)}" for name, b in r["roles_bytes"].items()]
    lines.append(f"  {'total':<15} {gib(r['resident_bytes'])}")
    lines.append(
        f"programs per chip (own arguments + outputs − aliased + temporaries + code, + the roles resident "
        f"beside it), of {gib(r['hbm_bytes']).strip()} HBM ({r['hbm_source']}):"
    )
    for name, p in r["programs"].items():
        lines.append(
            f"  {name:<11} {p['rows']:>4}×{p['length']:<5} own {gib(p['program_bytes'])} + beside "
            f"{gib(p['resident_beside_bytes'])} = {gib(p['per_chip_bytes'])}"
            f"{'+' if not p['compiled'] else ''} → {'FITS' if p['fits'] else 'DOES NOT FIT'} "
            f"(compile {p['compile_s']:.1f} s)"
        )
    lines.append(
        f"peak {r['peak_program']}: {gib(r['per_chip_bytes'])} per chip "
        f"({100 * r['per_chip_bytes'] / r['hbm_bytes']:.0f}% of HBM) → {'FITS' if r['fits'] else 'DOES NOT FIT'}"
    )
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)


def is_rl_config(path: str | None, overrides) -> bool:
    """A PPO/APA config: its YAML (or the overrides) sets one of the RL run's own top-level keys."""
    keys = {"policy", "reward_model", "algorithm", "rollout", "num_layers_unfrozen", "critic_init", "kl"}
    if any(o.split("=", 1)[0].split(".", 1)[0] in keys for o in overrides):
        return True
    if not path:
        return False
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError:
        return False  # load_config reports the missing file
    return isinstance(data, dict) and bool(keys & set(data))


def format_report(r: dict[str, Any]) -> str:
    gib = lambda b: f"{b / GIB:9.3f} GiB"
    m = r["memory_bytes"]
    slices = f" × {r['num_slices']} slices" if r.get("num_slices", 1) > 1 else ""
    mlp = f" (MLP in {r['mlp_chunks']} chunks)" if r.get("mlp_chunks", 1) > 1 else ""
    lines = [
        f"topology {r['topology']}{slices} ({r['topology_name']}): {r['num_chips']} × {r['device_kind']}, "
        f"mesh {r['mesh']}",
        f"model {r['model_type']} {r['num_layers']} layers, {r['num_params'] / 1e9:.2f}B params, "
        f"param {r['param_dtype']} / compute {r['dtype']}, remat {r['remat_policy']}{mlp}, scan {r['scan_layers']}, "
        f"attention {r.get('attention_impl', 'einsum')}",
        f"batch {r['batch'][0]}×{r['batch'][1]}×{r['batch'][2]} (B×K×L), {r['micro_batches']} micro-batches",
        f"compile: lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s",
        f"memory per chip ({r['memory_source']}):",
        f"  arguments       {gib(m['argument'])}",
        f"  outputs         {gib(m['output'])}",
        f"  − aliased       {gib(m['alias'])}   (donated state reused for the new state)",
        f"  temporaries     {gib(m['temp'])}",
        f"  generated code  {gib(m['generated_code'])}",
        *(
            [f"  (host memory    {gib(m['host_temp'])}   offloaded temporaries, in host RAM: not in the total)"]
            if m.get("host_temp")
            else []
        ),
        f"  total           {gib(r['per_chip_bytes'])}{'+' if not r['compiled'] else ''}  of {gib(r['hbm_bytes'])} "
        f"HBM ({r['hbm_source']}) → "
        f"{'FITS' if r['per_chip_bytes'] <= r['hbm_bytes'] and r['compiled'] else 'DOES NOT FIT'} "
        f"({100 * r['per_chip_bytes'] / r['hbm_bytes']:.0f}%)",
    ]
    if r.get("eval"):
        e = r["eval"]
        lines.append(
            f"eval step (batch {'×'.join(map(str, e['batch']))}): {gib(e['per_chip_bytes'])} per chip → "
            f"{'FITS' if e['fits'] else 'DOES NOT FIT'} (compile {e['compile_s']:.1f} s)"
        )
    if r["compiler_flops_per_chip"] is not None:
        lines.append(
            f"compiler FLOPs per chip: {r['compiler_flops_per_chip']:.3e} (cost_analysis; loop bodies "
            "— scanned layers, micro-batches — counted once)"
        )
    lines.append(f"model FLOPs per step: {r['model_flops_per_step']:.3e} ({r['tokens_per_step']} padded tokens)")
    if r["estimated_step_s"]:
        lines.append(
            f"ESTIMATE (not measured): {r['estimated_step_s']:.2f} s/step, {r['estimated_tokens_per_s']} "
            f"tokens/s at {r['assumed_mfu']:.0%} MFU of {r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s "
            "per chip"
        )
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)


def build_parser() -> cli.ArgumentParser:
    parser = cli.config_parser("python -m starling_jax.aot", __doc__, "train.micro_batches=8")
    parser.add_argument("--topology", required=True, help="cpu | v5p-32 | v5e-32 | v6e-16 | v5e:4x8 | ...")
    parser.add_argument(
        "--num-slices", type=int, default=1, help="slices of the topology joined over DCN (multi-slice; sets mesh.dcn)"
    )
    parser.add_argument("--num-layers", type=int, default=None, help="compile a shallower model (smoke runs)")
    parser.add_argument("--hbm-gib", type=float, default=None, help="override the per-chip memory capacity")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the step-time estimate")
    parser.add_argument(
        "--job",
        choices=("rm", "ppo"),
        default=None,
        help="the run the config is for (default: ppo when it sets policy / reward_model / "
        "algorithm / rollout ..., else rm)",
    )
    parser.add_argument(
        "--programs",
        default=None,
        help=f"PPO/APA: compile only these of {','.join(RL_PROGRAMS)} (comma-separated; default all)",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON summary line")
    return parser


def parse_args(argv):
    return cli.parse_config_args(build_parser(), argv)


def main(argv=None) -> int:
    def run():
        args = parse_args(sys.argv[1:] if argv is None else argv)  # usage errors: one line (cli.ArgumentParser)
        # Compile-only TPU devices come from libtpu's topology, not from a local TPU: keep JAX's backend on the CPU.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        cli.setup_logging(args.verbose)
        from starling_jax.config import load_config
        from starling_jax.train.rm_config import RMRunConfig

        if args.job == "ppo" or (args.job is None and is_rl_config(args.config, args.overrides)):
            from starling_jax.rl.config import PPORunConfig

            cfg = load_config(PPORunConfig, args.config, args.overrides)
            report = compile_rl_report(
                cfg, args.topology, args.num_layers, args.hbm_gib, args.num_slices, args.programs
            )
            text = format_rl_report
        else:
            cfg = load_config(RMRunConfig, args.config, args.overrides)
            report = compile_report(cfg, args.topology, args.num_layers, args.hbm_gib, args.mfu, args.num_slices)
            text = format_report
        if not args.json:
            print(text(report), flush=True)
        cli.print_summary(report)
        return 0 if report["fits"] else 1

    return cli.run_main(run)


if __name__ == "__main__":
    cli.without_torch()
    sys.exit(main())
