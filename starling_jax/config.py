"""Configs: dataclass schemas, filled from YAML files and `key=value` overrides with OmegaConf.

Every section is a dataclass owned by the component that uses it (ModelConfig in model/, MeshConfig in parallel/,
...), so defaults live in one place and are visible in the schema, never in `cfg.get(key, default)` calls.
Unknown keys, wrong types and failed `__post_init__` checks become one-line `ConfigError`s that name the source
(file or command line) and the full key. A schema's `MOVED_KEYS` ({old dotted key: new dotted key}, a ClassVar)
names keys that moved: the old spelling in a file or an override is refused with the new key, and saved configs
(`save_config`, `to_dict`) leave the old keys out (so they load again).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from starling_jax.errors import ConfigError

T = TypeVar("T")


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    key = getattr(err, "full_key", None)
    where = f" (key {key})" if key and key not in first else ""
    return ConfigError(f"{source}: {first}{where}")


_ABSENT = object()


def _moved_error(moved: dict[str, str], old: str, source: str, value=_ABSENT) -> ConfigError:
    new = moved[old]
    hint = f"write {new}={value}" if value is not _ABSENT else f"move it under {new.rsplit('.', 1)[0]}:"
    return ConfigError(f"{source}: {old} is now {new} (the runtime section every trainer shares); {hint}")


def _check_moved(schema, file_cfg, path, overrides: Sequence[str]) -> None:
    """One-line errors for the old spelling of a moved key (the schema's `MOVED_KEYS`), in the file or an override."""
    moved = getattr(schema, "MOVED_KEYS", None) or {}
    for old in moved:
        if file_cfg is not None and OmegaConf.select(file_cfg, old, default=_ABSENT) is not _ABSENT:
            raise _moved_error(moved, old, str(path))
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+~") in moved:
            raise _moved_error(moved, key.lstrip("+~"), f"command line override {item!r}", value)


def _without_moved(cfg) -> dict:
    """A plain dict of a config instance, without its schema's moved keys (which hold the schema defaults)."""
    data = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    for old in getattr(type(cfg), "MOVED_KEYS", None) or {}:
        *parents, leaf = old.split(".")
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return data


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """schema defaults ← YAML file ← `key=value` overrides, validated; returns a `schema` instance."""
    merged = OmegaConf.structured(schema)
    file_cfg = None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors come in several types
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        _check_moved(schema, file_cfg, path, ())
        try:
            merged = OmegaConf.merge(merged, file_cfg)
        except OmegaConfBaseException as e:
            raise _explain(e, str(path)) from None
    _check_moved(schema, None, path, overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} is not of the form key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _explain(e, f"command line override {item!r}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{path or 'config'}: required keys have no value: {', '.join(missing)}")
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _explain(e, str(path or "config")) from None


def to_dict(cfg) -> dict:
    """A plain dict of a config instance (for JSON metadata and TensorBoard), without moved keys."""
    return _without_moved(cfg)


def save_config(cfg, path: str | Path) -> None:
    from starling_jax.paths import as_path

    # a local path or a gs:// URL; without moved keys, so that the file loads again (launch re-runs it)
    as_path(path).write_text(OmegaConf.to_yaml(OmegaConf.create(_without_moved(cfg))))


def field(factory):
    """`dataclasses.field(default_factory=...)`, shorter in schemas."""
    return dataclasses.field(default_factory=factory)
