"""Sharded model creation: abstract shapes → shardings → jitted init with `out_shardings`.

No full copy of the parameters ever exists on one device: each device materializes only its shards.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from starling_jax.model.config import ModelConfig
from starling_jax.model.heads import role_class
from starling_jax.parallel import sharding


def abstract_model(cfg: ModelConfig, role: str) -> tuple[nnx.GraphDef, nnx.State]:
    """GraphDef and a state of `ShapeDtypeStruct`s (with logical axes metadata); allocates nothing."""
    model = nnx.eval_shape(lambda: role_class(role)(cfg, nnx.Rngs(params=0)))
    return nnx.split(model)


def create_sharded(cfg: ModelConfig, role: str, mesh: Mesh, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """Randomly initialized parameters, created directly in their shards on `mesh`."""
    graphdef, abstract = abstract_model(cfg, role)
    shardings = sharding.state_shardings(abstract, mesh)

    def init():
        return nnx.state(role_class(role)(cfg, nnx.Rngs(params=seed)))

    init = jax.jit(init, out_shardings=shardings)
    return graphdef, init()


def num_params(state: nnx.State) -> int:
    return sum(x.size for x in jax.tree.leaves(state))
