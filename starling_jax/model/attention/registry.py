"""The attention registry: `runtime.attention_impl` names one `Implementation` (or `auto`), and everything that
attends selects through here: the decoder's layers and the RL hydra (`prepare` / `attend`), the decoder's
selected rows and the sampler's prefill and decode over the KV cache (`attend_cached`), config validation
(`check_impl`, `check_layout`) and `aot`'s report (`resolve`).

Adding an implementation is one `register(Implementation(...))`: its name is then a valid `runtime.attention_impl`.
`auto` is not an entry: it resolves, when the program is traced, to the entry `AUTO` names for the platform of
the mesh the program runs on (`trace_platform`), else the reference. One recipe then serves a TPU pod, a GPU
cluster and an ahead-of-time compile for a TPU topology on a CPU host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Iterator

import jax

from starling_jax.errors import ConfigError
from starling_jax.model.attention.rule import LAYOUTS
from starling_jax.parallel import sharding

log = logging.getLogger(__name__)

REFERENCE = "einsum"  # the entry `auto` falls back to, and whose cached path serves entries without one
AUTO = {"tpu": "splash", "gpu": "blockwise"}  # platform → the entry `auto` picks there (else REFERENCE)
_PLATFORM_NAMES = {"tpu": "TPU", "gpu": "GPU", "cpu": "CPU"}


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One attention implementation, as the registry knows it.

    name       its `runtime.attention_impl` value.
    layouts    which of `rule.LAYOUTS` it can attend over (`check_layout` refuses the others).
    platforms  the JAX platforms it runs on; None: any.
    prepare    (cfg, segment_ids [N, L], positions [N, L]) → its context, built once per forward pass and handed
               to every layer (a mask, lengths, the ids themselves: anything that is a pytree of arrays).
    attend     (cfg, q [N, L, H, Dh], k [N, L, G, Dh], v, context) → [N, L, H, Dh] (q and k after RoPE).
    attend_cached  (cfg, q [N, Q, H, Dh], blocks) → [N, Q, H, Dh]: q over the keys of `blocks` jointly, each
               block (k, v, mask) or (k, v, mask, True) as `einsum.gqa_attention` takes them (masks are the
               rule's, broadcastable to [N, 1, 1, Q, Lk]; True: k, v heads-first, the sampler's KV cache). Serves
               the sampler's prefill and decode steps and `Decoder(select=...)`'s rows. None: the reference's
               (`attend_cached` logs that once).
    refuses    (layout, sliding_window, max_length) → None, or why this configuration is refused, as the tail
               of "runtime.attention_impl=X cannot handle data.layout=Y ..." (a limit beyond `layouts`)."""

    name: str
    layouts: frozenset[str]
    platforms: frozenset[str] | None
    prepare: Callable[..., Any]
    attend: Callable[..., jax.Array]
    attend_cached: Callable[..., jax.Array] | None = None
    refuses: Callable[[str, int | None, int | None], str | None] | None = None

    def __post_init__(self):
        if self.name == "auto" or not self.name:
            raise ValueError(f"attention implementation name {self.name!r} is reserved")
        unknown = set(self.layouts) - set(LAYOUTS)
        if unknown:
            raise ValueError(
                f"attention implementation {self.name}: unknown layouts {sorted(unknown)}; choose from {list(LAYOUTS)}"
            )


_REGISTRY: dict[str, Implementation] = {}
_LOGGED: set[str] = set()


def register(impl: Implementation) -> Implementation:
    """Adds `impl` under its name (a name already taken is a ValueError: unregister it first)."""
    if impl.name in _REGISTRY:
        raise ValueError(f"attention implementation {impl.name!r} is already registered")
    _REGISTRY[impl.name] = impl
    return impl


def unregister(name: str) -> Implementation:
    return _REGISTRY.pop(name)


@contextlib.contextmanager
def registered(impl: Implementation) -> Iterator[Implementation]:
    """`impl` registered for the duration of the block."""
    register(impl)
    try:
        yield impl
    finally:
        unregister(impl.name)


def names() -> tuple[str, ...]:
    """Every valid `runtime.attention_impl`: the entries in registration order, then `auto`."""
    return (*_REGISTRY, "auto")


def check_impl(impl: str) -> None:
    """One-line ConfigError unless `impl` names an entry or `auto`."""
    if impl not in names():
        raise ConfigError(f"runtime.attention_impl={impl!r}: choose one of {list(names())}")


def get(name: str) -> Implementation:
    """The entry registered as `name` (not `auto`: see `select`)."""
    if name not in _REGISTRY:
        raise ConfigError(f"runtime.attention_impl={name!r}: choose one of {list(_REGISTRY)}")
    return _REGISTRY[name]


def trace_platform() -> str:
    """The platform the program is traced for: the enclosing `activation_sharding` mesh's devices (a TPU
    topology's on a CPU host under `aot`), else JAX's default backend."""
    mesh = sharding.active_mesh()
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def resolve(impl: str, platform: str | None = None) -> str:
    """`impl`, with `auto` replaced by the entry for `platform` (`AUTO`; default: `trace_platform()`)."""
    if impl != "auto":
        return impl
    pick = AUTO.get(platform or trace_platform(), REFERENCE)
    return pick if pick in _REGISTRY else REFERENCE


def candidates(impl: str) -> list[Implementation]:
    """The entries `impl` may run as: itself, or for `auto` every entry it can pick on some platform (a config
    is checked before the platform is known, so `auto` accepts what all of them accept)."""
    check_impl(impl)
    if impl != "auto":
        return [_REGISTRY[impl]]
    picks = dict.fromkeys([*AUTO.values(), REFERENCE])
    return [_REGISTRY[name] for name in picks if name in _REGISTRY]


def layouts(impl: str) -> frozenset[str]:
    """The layouts `impl` can attend over (for `auto`, those all its candidates can)."""
    return frozenset.intersection(*(c.layouts for c in candidates(impl)))


def check_layout(
    impl: str, layout: str, sliding_window: int | None = None, max_length: int | None = None, what: str | None = None
) -> None:
    """One-line ConfigError when `runtime.attention_impl=impl` cannot attend over `data.layout=layout` (rows of
    `max_length` tokens, with the model's `sliding_window`); `what` names the layout in the message (default
    `data.layout=<layout>`)."""
    supported = layouts(impl)
    what = what or f"data.layout={layout}"
    if layout not in supported:
        ok = sorted(name for name in names() if layout in layouts(name))
        raise ConfigError(
            f"runtime.attention_impl={impl} cannot handle {what} (it supports "
            f"{sorted(supported)}); use attention_impl one of {ok}"
        )
    for entry in candidates(impl):
        reason = entry.refuses(layout, sliding_window, max_length) if entry.refuses else None
        if reason:
            raise ConfigError(f"runtime.attention_impl={impl} cannot handle {what} {reason}")


def select(impl: str, platform: str | None = None) -> Implementation:
    """The entry that runs for `impl` on `platform` (default: `trace_platform()`); a one-line ConfigError when
    it does not run there."""
    check_impl(impl)
    platform = platform or trace_platform()
    entry = get(resolve(impl, platform))
    if entry.platforms is not None and platform not in entry.platforms:
        need = " or ".join(_PLATFORM_NAMES.get(p, p) for p in sorted(entry.platforms))
        here = [e.name for e in _REGISTRY.values() if e.platforms is None or platform in e.platforms]
        raise ConfigError(
            f"runtime.attention_impl={entry.name} needs a {need} (these devices are {platform}); use one of {here}"
        )
    return entry


def prepare(cfg, segment_ids, positions):
    """What `attend` needs, computed once per forward pass (shared by all layers): the selected entry's
    `prepare`."""
    return select(cfg.attention_impl).prepare(cfg, segment_ids, positions)


def attend(cfg, q, k, v, context):
    """q [N, L, H, Dh], k/v [N, L, G, Dh] (after RoPE) → [N, L, H, Dh] with `cfg.attention_impl`; `context`: what
    `prepare` built (both resolve `auto` for the same traced platform, so they select the same entry)."""
    return select(cfg.attention_impl).attend(cfg, q, k, v, context)


def attend_cached(cfg, q, blocks):
    """q [N, Q, H, Dh] over the key/value `blocks` (see `Implementation.attend_cached`) with `cfg.attention_impl`,
    or the reference's when that entry has no cached path."""
    entry = select(cfg.attention_impl)
    if entry.attend_cached is None:
        if entry.name not in _LOGGED:
            _LOGGED.add(entry.name)
            log.info(
                "runtime.attention_impl=%s has no cached path: the sampler and selected rows use %s's",
                entry.name,
                REFERENCE,
            )
        entry = _REGISTRY[REFERENCE]
    return entry.attend_cached(cfg, q, blocks)
