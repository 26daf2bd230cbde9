"""The reward-model run config: one dataclass per component, each validated when built.

`python -m starling_jax.train_rm [CONFIG.yaml] [key=value ...]` fills `RMRunConfig` from these defaults (the
embedded CPU demo), then the YAML file, then the overrides. See `configs/rm_base.yaml` for every key, commented.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from starling_jax.cli import DEFAULT_MAX_LENGTH, DEFAULT_RUN_DIR
from starling_jax.config import field
from starling_jax.data.layout import LAYOUTS
from starling_jax.data.pipeline import LOADERS
from starling_jax.data.synthetic import BUNDLED_ALIAS
from starling_jax.errors import ConfigError
from starling_jax.model.attention import check_layout
from starling_jax.model.config import ModelConfig
from starling_jax.parallel.sharding import MeshConfig
from starling_jax.train.job import ExportConfig, TrainConfig
from starling_jax.train.optimizer import OptimConfig
from starling_jax.train.rm_step import LossConfig
from starling_jax.train.runtime import MOVED_MODEL_KEYS, RuntimeConfig, check_model_runtime

TEMPLATES = ("llama2_chat", "openchat_3.5", "chatml", "raw", "tokenizer")


def tiny_model() -> ModelConfig:
    """A Mistral-shaped reward model small enough to train on a 2-core CPU in minutes (real 32k vocabulary)."""
    return ModelConfig(
        model_type="mistral",
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4096,
        max_position_embeddings=4096,
        pad_token_id=0,
        initializer_range=0.05,
    )


@dataclasses.dataclass
class DataConfig:
    train: str = BUNDLED_ALIAS  # prepared dataset folder (prepare_data), a Nectar-schema file, or a Hub dataset name
    eval: str | None = None  # None → held-out split of `train` by prompt hash (eval_fraction)
    eval_fraction: float = 0.1
    tokenizer: str | None = None  # HF tokenizer folder; None → the offline Mistral tokenizer (mistral-common)
    template: str = "llama2_chat"  # the Starling-RM-7B-alpha format; or openchat_3.5 | chatml | raw | tokenizer
    max_length: int = DEFAULT_MAX_LENGTH  # prompt + answer tokens; prepare_data's --max-length default too
    num_answers: int = 7  # K: answers per prompt in a batch (rows with fewer are masked, more keep the K best)
    pad_to_multiple: int = 128
    batch_size: int = 8  # prompts per optimizer step, global (all hosts)
    eval_batch_size: int = 16
    on_bad_row: str = "error"  # error | skip
    # per_answer: K rows per prompt. shared_prefix: the prompt once, its answers after it (data/layout.py).
    layout: str = "per_answer"
    packing: bool = False  # several prompts' rows in one row of max_length tokens (needs a segment-aware attention)
    # how batches are read ahead (never what they hold): tf_data | threads | auto (tf.data for a prepared dataset,
    # threads for a file: no TensorFlow import, ~10 s less start-up on a CPU)
    loader: str = "auto"

    @property
    def attention_layout(self) -> str:
        """What the attention must handle: per_answer | packed | shared_prefix (model/attention/registry.py)."""
        return "shared_prefix" if self.layout == "shared_prefix" else ("packed" if self.packing else "per_answer")

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ConfigError(f"data.template={self.template!r}: choose one of {list(TEMPLATES)}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"data.layout={self.layout!r}: choose one of {list(LAYOUTS)}")
        if self.loader not in LOADERS:
            raise ConfigError(f"data.loader={self.loader!r}: choose one of {list(LOADERS)}")
        if self.on_bad_row not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_row={self.on_bad_row!r}: choose error or skip")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction}: must be in [0, 1)")
        if self.num_answers < 2 or self.batch_size < 1 or self.max_length < 8:
            raise ConfigError("data.num_answers must be >= 2, data.batch_size >= 1, data.max_length >= 8")


@dataclasses.dataclass
class RMRunConfig:
    output_dir: str = DEFAULT_RUN_DIR
    seed: int = 0  # fixes init, data order and anything sampled
    MOVED_KEYS: ClassVar[dict[str, str]] = MOVED_MODEL_KEYS  # model.<runtime key> → runtime.<key>

    # HF folder or Hub id whose weights initialize the trunk (the score head starts random unless the folder is a
    # reward model). Its config.json fixes the architecture (`model` is then ignored). None → random init of `model`.
    init_from: str | None = None
    model: ModelConfig = field(tiny_model)  # the architecture (its runtime fields come from `runtime`)
    runtime: RuntimeConfig = field(RuntimeConfig)  # dtypes, remat, scan, attention: for init_from's model too
    mesh: MeshConfig = field(MeshConfig)
    # the CPU demo's sequences are < 64 tokens: pad to 32 there (the TPU recipes pad to 128)
    data: DataConfig = field(lambda: DataConfig(pad_to_multiple=32))
    optim: OptimConfig = field(lambda: OptimConfig(learning_rate=1e-3, warmup_steps=100, weight_decay=0.0))
    loss: LossConfig = field(LossConfig)
    train: TrainConfig = field(lambda: TrainConfig(steps=500))  # the embedded default converges by then
    export: ExportConfig = field(ExportConfig)

    def __post_init__(self):
        if self.train.micro_batches > 1 and self.data.batch_size % self.train.micro_batches:
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} is not divisible by "
                f"train.micro_batches={self.train.micro_batches}"
            )
        check_model_runtime(self.model)
        check_layout(
            self.runtime.attention_impl, self.data.attention_layout, self.model.sliding_window, self.data.max_length
        )

    @property
    def model_config(self) -> ModelConfig:
        """`model` with the runtime fields of `runtime` (the architecture trained without `init_from`)."""
        return self.model.replace(**self.runtime.model_kwargs())
