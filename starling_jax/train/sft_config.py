"""The SFT run config: `python -m starling_jax.train_sft [CONFIG.yaml] [key=value ...]` fills `SFTRunConfig` from
these defaults (the embedded CPU demo), then the YAML file, then the overrides; `configs/sft_base.yaml` lists every
key, commented."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from starling_jax.config import field
from starling_jax.data.chat import TEMPLATE_NAMES
from starling_jax.data.synthetic import BUNDLED_ALIAS
from starling_jax.errors import ConfigError
from starling_jax.model.attention import check_layout
from starling_jax.model.config import ModelConfig
from starling_jax.parallel.sharding import MeshConfig
from starling_jax.train.job import ExportConfig, TrainConfig
from starling_jax.train.optimizer import OptimConfig
from starling_jax.train.runtime import MOVED_MODEL_KEYS, RuntimeConfig, check_model_runtime

DEFAULT_SFT_DIR = "runs/sft_default"


def tiny_policy() -> ModelConfig:
    """A Mistral-shaped causal LM small enough to fine-tune on a 2-core CPU in minutes (real 32k vocabulary)."""
    return ModelConfig(
        model_type="mistral",
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4096,
        max_position_embeddings=4096,
        pad_token_id=0,
        initializer_range=0.05,
    )


@dataclasses.dataclass
class SFTDataConfig:
    train: str = BUNDLED_ALIAS  # Nectar-schema file (rank-1 answers) or JSON lines of {"messages": [...]}
    eval: str | None = None  # None → held-out split of `train` by prompt hash (eval_fraction)
    eval_fraction: float = 0.1
    tokenizer: str | None = None  # HF tokenizer folder; None → init_from's, else the offline Mistral tokenizer
    template: str = "llama2_chat"  # llama2_chat | openchat_3.5 | chatml | raw | tokenizer (the tokenizer's own)
    max_length: int = 256
    pad_to_multiple: int = 64  # the bundled data's conversations are < 64 tokens: one compiled shape
    batch_size: int = 16  # conversations per optimizer step, global (all hosts)
    eval_batch_size: int = 32
    on_bad_row: str = "error"  # error | skip

    def __post_init__(self):
        if self.template not in TEMPLATE_NAMES:
            raise ConfigError(f"data.template={self.template!r}: choose one of {list(TEMPLATE_NAMES)}")
        if self.on_bad_row not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_row={self.on_bad_row!r}: choose error or skip")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction}: must be in [0, 1)")
        if self.batch_size < 1 or self.eval_batch_size < 1 or self.max_length < 8:
            raise ConfigError("data.batch_size and data.eval_batch_size must be >= 1, data.max_length >= 8")


@dataclasses.dataclass
class SFTRunConfig:
    output_dir: str = DEFAULT_SFT_DIR
    seed: int = 0  # fixes init and data order
    MOVED_KEYS: ClassVar[dict[str, str]] = MOVED_MODEL_KEYS  # model.<runtime key> → runtime.<key>

    # HF folder or Hub id of a causal LM (e.g. openchat/openchat_3.5); its config.json fixes the architecture
    # (`model` is then ignored). None → random init of `model`.
    init_from: str | None = None
    model: ModelConfig = field(tiny_policy)  # the architecture (its runtime fields come from `runtime`)
    runtime: RuntimeConfig = field(RuntimeConfig)  # dtypes, remat, scan, attention: for init_from's model too
    mesh: MeshConfig = field(MeshConfig)
    data: SFTDataConfig = field(SFTDataConfig)
    optim: OptimConfig = field(lambda: OptimConfig(learning_rate=3e-3, warmup_steps=20))
    train: TrainConfig = field(lambda: TrainConfig(steps=100, eval_every=50, save_every=50, log_every=10))
    export: ExportConfig = field(ExportConfig)

    def __post_init__(self):
        if self.train.micro_batches > 1 and self.data.batch_size % self.train.micro_batches:
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} is not divisible by "
                f"train.micro_batches={self.train.micro_batches}"
            )
        check_model_runtime(self.model)
        # conversations are right-padded rows of one segment each: every implementation handles them
        check_layout(self.runtime.attention_impl, "per_answer")

    @property
    def model_config(self) -> ModelConfig:
        """`model` with the runtime fields of `runtime` (the architecture trained without `init_from`)."""
        return self.model.replace(**self.runtime.model_kwargs())
