"""AdamW with warm-up and decay, gradient clipping, and frozen bottom layers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from starling_jax.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = 1e-5
    end_learning_rate_ratio: float = 0.1  # final lr = learning_rate × this (cosine / linear decay)
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    # Freeze the token embeddings and the bottom N decoder layers (Starling-LM trained only its top 4 layers).
    freeze_layers: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r}: choose one of {list(SCHEDULES)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"optim.learning_rate={self.learning_rate}: must be positive")
        if self.warmup_steps < 0 or self.freeze_layers < 0:
            raise ConfigError("optim.warmup_steps and optim.freeze_layers must be >= 0")


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_learning_rate_ratio
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_learning_rate_ratio)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def trainable_mask(params: nnx.State, freeze_layers: int, num_layers: int) -> nnx.State:
    """1.0 where a parameter trains, 0.0 where it is frozen; for stacked (scanned) layers, a per-layer vector
    broadcast over the stacked axis."""
    if freeze_layers > num_layers:
        raise ConfigError(f"optim.freeze_layers={freeze_layers} exceeds the model's {num_layers} layers")

    def mask(path, x):
        names = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        if freeze_layers == 0:
            return jnp.ones((), jnp.float32)
        if "embed" in names and "decoder" in names and "layers" not in names:
            return jnp.zeros((), jnp.float32)
        if "layers" in names:
            i = names.index("layers")
            nxt = names[i + 1] if i + 1 < len(names) else ""
            if nxt.isdigit():  # list layout: decoder.layers.<i>.…
                return jnp.asarray(0.0 if int(nxt) < freeze_layers else 1.0, jnp.float32)
            per_layer = (jnp.arange(x.shape[0]) >= freeze_layers).astype(jnp.float32)  # stacked layout
            return per_layer.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.ones((), jnp.float32)

    return jax.tree_util.tree_map_with_path(mask, params)


def make_optimizer(
    cfg: OptimConfig, total_steps: int, mask: nnx.State | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg, total_steps)
    masking = []
    if mask is not None:
        masking = [
            optax.GradientTransformation(
                lambda _: optax.EmptyState(),
                lambda updates, state, params=None: (
                    jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, mask),
                    state,
                ),
            )
        ]
    clip = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    # Masked before clipping (frozen gradients do not count in the norm) and after AdamW (its weight decay would
    # otherwise still move frozen weights).
    return optax.chain(*masking, *clip, adamw, *masking), schedule
