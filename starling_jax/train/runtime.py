"""The `runtime:` section every trainer shares (train_rm, train_sft, train_ppo): how the models run, not what they
are. The architecture comes from `model:` (RM/SFT without `init_from`) or from an HF folder's config.json; these
fields are applied to every model a trainer builds or loads (`model_kwargs` → `ModelConfig` / `hf_io.load_hf`).

`RLRuntimeConfig` adds the one key only a trainer with frozen models has (`frozen_param_dtype`: PPO/APA's reference
and reward model). RM and SFT runs used to take these keys under `model.`; `MOVED_MODEL_KEYS` lists them so that
`config.load_config` refuses the old spelling with a one-line error naming the new key.
"""

from __future__ import annotations

import dataclasses

from starling_jax.errors import ConfigError
from starling_jax.model import attention
from starling_jax.model.config import DTYPES, REMAT_POLICIES

# The ModelConfig fields this section sets (same names there).
RUNTIME_KEYS = (
    "param_dtype",
    "dtype",
    "remat_policy",
    "scan_layers",
    "mlp_chunks",
    "attention_impl",
    "attention_block",
)
# The old `model.<key>` spellings of RM/SFT runs → the new key (config.load_config refuses the old ones).
MOVED_MODEL_KEYS = {f"model.{k}": f"runtime.{k}" for k in RUNTIME_KEYS}


@dataclasses.dataclass
class RuntimeConfig:
    param_dtype: str = "float32"  # master weights (and Adam moments) of the trained model(s)
    dtype: str = "float32"  # compute dtype: bfloat16 on TPU/GPU
    remat_policy: str = "none"  # none | full | full_offload (layer inputs in host RAM) | dots | dots_no_batch
    scan_layers: bool = False  # true: one stacked layer under lax.scan (compile time independent of depth)
    # The MLP over the sequence in this many chunks, each under remat_policy: less backward memory, same results.
    mlp_chunks: int = 1
    # einsum | blockwise | fused | cudnn | splash | auto (model/attention/). auto: splash on TPU, blockwise on GPU,
    # einsum on CPU, resolved for the mesh each program is compiled for.
    attention_impl: str = "auto"
    attention_block: int = 0  # blockwise: query/key block length; 0 = by platform and row length (resolve_blocks)

    def __post_init__(self):
        for key in ("param_dtype", "dtype") + (("frozen_param_dtype",) if hasattr(self, "frozen_param_dtype") else ()):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"runtime.{key}={getattr(self, key)!r}: choose one of {sorted(DTYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"runtime.remat_policy={self.remat_policy!r}: choose one of {list(REMAT_POLICIES)}")
        attention.check_impl(self.attention_impl)  # the registry's names, registered entries included
        if self.attention_block < 0:
            raise ConfigError(f"runtime.attention_block={self.attention_block}: must be >= 0 (0 = by platform)")
        if self.mlp_chunks < 1:
            raise ConfigError(f"runtime.mlp_chunks={self.mlp_chunks}: must be >= 1 (1 = the whole sequence at once)")

    def model_kwargs(self, frozen: bool = False) -> dict:
        """The `ModelConfig` runtime fields (for `ModelConfig.replace` / `hf_io.load_hf(**kwargs)`); `frozen`: of a
        frozen model (its `frozen_param_dtype`, where the section has one)."""
        kwargs = {k: getattr(self, k) for k in RUNTIME_KEYS}
        if frozen:
            kwargs["param_dtype"] = getattr(self, "frozen_param_dtype", self.param_dtype)
        return kwargs


@dataclasses.dataclass
class RLRuntimeConfig(RuntimeConfig):
    """train_ppo's runtime section: `param_dtype` is the actor's and critic's, `frozen_param_dtype` the reference's
    and reward model's."""

    frozen_param_dtype: str = "float32"  # reference and reward model (bfloat16 halves their memory)


def check_model_runtime(model, source: str = "model") -> None:
    """Refuses a `model:` section (a ModelConfig) whose runtime fields are not the defaults: they moved to
    `runtime:` and would otherwise be silently replaced by it (programmatic configs; load_config refuses the YAML
    and command-line spellings before)."""
    from starling_jax.model.config import ModelConfig

    default = ModelConfig()
    for key in RUNTIME_KEYS:
        if getattr(model, key) != getattr(default, key):
            raise ConfigError(
                f"{source}.{key}={getattr(model, key)!r}: this key moved to runtime.{key} (the runtime "
                f"section every trainer shares); set runtime.{key}={getattr(model, key)} instead"
            )
