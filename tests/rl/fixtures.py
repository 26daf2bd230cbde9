"""Tiny models for the RL tests, built without compiling anything (eager or jitted NNX init of even a 4-layer model
costs tens of seconds on the shared 2-core CI machine)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starling_jax.model.config import ModelConfig
from starling_jax.model.create import abstract_model


def _names(path) -> tuple[str, ...]:
    """('decoder', 'layers', '0', 'attn', 'q_proj') from a pytree key path (the Variable's `.value` dropped)."""
    return tuple(str(p.key) for p in path if hasattr(p, "key"))


def tiny_model(cfg: ModelConfig, role: str, seed: int = 0) -> nnx.Module:
    """Random weights drawn by numpy: N(0, 0.02²) matrices, RMSNorm scales 1 + N(0, 0.1²)."""
    graphdef, abstract = abstract_model(cfg, role)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        values = (
            (1.0 + rng.normal(0.0, 0.1, leaf.shape))
            if _names(path)[-1] == "scale"
            else rng.normal(0.0, 0.02, leaf.shape)
        )
        return jnp.asarray(values, leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, abstract))


def perturb(model: nnx.Module, keep, scale: float = 0.05, seed: int = 1) -> None:
    """Adds N(0, scale²) noise (numpy) to every parameter whose path (a tuple of str) `keep(path)` rejects; for
    stacked layers `keep` may instead return a boolean row mask over the stacked axis (True = unchanged rows)."""
    rng = np.random.default_rng(seed)

    def bump(path, x):
        kept = keep(_names(path))
        if kept is True:
            return x
        noise = rng.normal(0.0, scale, x.shape)
        if kept is not False:
            noise[np.asarray(kept)] = 0.0
        return x + jnp.asarray(noise, x.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(bump, nnx.state(model, nnx.Param)))
