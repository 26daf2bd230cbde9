"""Configs: dataclass schemas, filled from YAML files and `key=value` overrides with OmegaConf.

Every section is a dataclass owned by the component that uses it (ModelConfig in model/, MeshConfig in parallel/,
...), so defaults live in one place and are visible in the schema, never in `cfg.get(key, default)` calls.
Unknown keys, wrong types and failed `__post_init__` checks become one-line `ConfigError`s that name the source
(file or command line) and the full key.
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


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """schema defaults ← YAML file ← `key=value` overrides, validated; returns a `schema` instance."""
    merged = OmegaConf.structured(schema)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors come in several types
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        try:
            merged = OmegaConf.merge(merged, file_cfg)
        except OmegaConfBaseException as e:
            raise _explain(e, str(path)) from None
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
    """A plain dict of a config instance (for JSON metadata and TensorBoard)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg, path: str | Path) -> None:
    from starling_jax.paths import as_path

    as_path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))  # a local path or a gs:// URL


def field(factory):
    """`dataclasses.field(default_factory=...)`, shorter in schemas."""
    return dataclasses.field(default_factory=factory)
