"""The on-policy rounds' config: `python -m starling_jax.onpolicy [CONFIG.yaml] [key=value ...]` fills `OnPolicyConfig`
from these defaults (two quick rounds on the embedded defaults: the `train_sft` policy, the `train_rm` reward model
as the judge, the bundled prompts), then the YAML file, then the overrides; `configs/onpolicy_base.yaml` lists every
key, `configs/onpolicy_example.yaml` is the two-round example."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from starling_jax.cli import DEFAULT_HF_DIR
from starling_jax.config import field
from starling_jax.data.chat import TEMPLATE_NAMES
from starling_jax.data.synthetic import BUNDLED_ALIAS
from starling_jax.errors import ConfigError
from starling_jax.judge.spec import parse_judge
from starling_jax.train.dpo_config import DEFAULT_POLICY, DPORunConfig
from starling_jax.train.job import TrainConfig
from starling_jax.train.optimizer import OptimConfig
from starling_jax.train.rm_config import RMRunConfig
from starling_jax.train.runtime import MOVED_MODEL_KEYS

DEFAULT_ONPOLICY_DIR = "runs/onpolicy_default"
UPDATES = ("dpo", "rm")


@dataclasses.dataclass
class RoundPromptsConfig:
    # the RL prompts: a Nectar-schema file (its HH `prompt` column) or JSON lines of {"messages": [...]}, as
    # train_ppo's prompts.train
    train: str = BUNDLED_ALIAS
    per_round: int = 64  # prompts each round samples (a seeded order: rounds take disjoint prompts while they last)
    eval_prompts: int = 16  # held out (never sampled for labels): the held-out reward of each round's policy

    def __post_init__(self):
        if self.per_round < 1 or self.eval_prompts < 1:
            raise ConfigError("prompts.per_round and prompts.eval_prompts must be >= 1")


@dataclasses.dataclass
class RoundSamplingConfig:
    num_samples: int = 4  # K: answers per prompt (generate --num-samples), ranked by the judge
    max_new_tokens: int = 32
    temperature: float = 1.0  # K draws at 0 would be one answer K times
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    batch_size: int = 64  # rows per sampler batch
    template: str = "tokenizer"  # the policy's chat format: its tokenizer's own, or a named template
    stop: list[str] = field(list)  # extra stop strings (the template's end-of-turn markers always stop)
    # drop an answer whose text an earlier answer of its prompt has (gather_answers --dedupe); a prompt left with
    # fewer than 2 answers is not labelled
    dedupe: bool = True

    def __post_init__(self):
        if self.num_samples < 2:
            raise ConfigError(f"sampling.num_samples={self.num_samples}: a ranking needs at least 2 answers")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.temperature < 0:
            raise ConfigError("sampling.max_new_tokens and batch_size must be >= 1, sampling.temperature >= 0")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("sampling.top_p must be in (0, 1] and sampling.top_k >= 0")
        if self.template not in TEMPLATE_NAMES:
            raise ConfigError(f"sampling.template={self.template!r}: choose one of {list(TEMPLATE_NAMES)}")


@dataclasses.dataclass
class RoundLabelConfig:
    judge: str | None = None  # rm:DIR or openai:MODEL (label --judge); null → rm:<reward_model>
    base_url: str | None = None  # openai: the server (label --base-url); null → OpenAI's
    judge_template: str | None = None  # openai: the judge prompt file; null → the shipped Nectar rubric
    orders: int = 1  # openai: shuffled orders per row, Borda-aggregated (label --orders)
    concurrency: int = 4  # openai: requests in flight
    max_length: int | None = None  # rm: tokens per sequence; null → the reward model's own

    def __post_init__(self):
        if self.judge is not None:
            try:
                parse_judge(self.judge)
            except ConfigError:
                raise ConfigError(f"label.judge={self.judge!r}: expected openai:MODEL or rm:DIR") from None
        if self.orders < 1 or self.concurrency < 1:
            raise ConfigError("label.orders and label.concurrency must be >= 1")


def round_dpo() -> DPORunConfig:
    """train_dpo's embedded default, shortened for a round (its `output_dir`, `policy` and `data.train` are set by
    each round): 40 steps on the round's labels, a quarter of the prompts held out for the pairwise accuracy."""
    cfg = DPORunConfig()
    cfg.data.num_answers = 4
    cfg.data.eval_fraction = 0.25
    cfg.train = TrainConfig(steps=40, eval_every=40, save_every=40, log_every=10)
    cfg.optim = OptimConfig(learning_rate=1e-3, warmup_steps=5, schedule="constant")
    return cfg


def round_rm() -> RMRunConfig:
    """train_rm's embedded default as a continued run (its `output_dir`, `init_from` and `data.train` are set by each
    round: the previous round's reward model, or `reward_model` in round 1)."""
    cfg = RMRunConfig()
    cfg.data.num_answers = 4
    cfg.data.eval_fraction = 0.25
    cfg.train = TrainConfig(steps=40, eval_every=40, save_every=40, log_every=10)
    cfg.optim = OptimConfig(learning_rate=3e-4, warmup_steps=5, schedule="constant")
    return cfg


@dataclasses.dataclass
class OnPolicyConfig:
    output_dir: str = DEFAULT_ONPOLICY_DIR  # round_0/ (the start's held-out reward), round_1/, round_2/, ...
    seed: int = 0  # fixes the prompt split and order, and the sampling keys (round N draws with seed + N)
    rounds: int = 2
    # dpo.model.<runtime key> → dpo.runtime.<key>, and rm.'s (as train_dpo's and train_rm's own configs)
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        f"{section}.{old}": f"{section}.{new}" for section in UPDATES for old, new in MOVED_MODEL_KEYS.items()
    }
    policy: str = DEFAULT_POLICY  # round 1's policy (HF folder or checkpoint); round N+1 starts from round N's
    # the reward model that measures every round's held-out reward, the default judge (rm:<reward_model>) and the
    # starting point of a continued train_rm (update: [rm])
    reward_model: str = DEFAULT_HF_DIR
    # what each round trains on its labels: dpo (the policy, against a frozen copy of the round's starting policy)
    # and/or rm (a continued train_rm of the previous round's reward model)
    update: list[str] = field(lambda: ["dpo"])
    prompts: RoundPromptsConfig = field(RoundPromptsConfig)
    sampling: RoundSamplingConfig = field(RoundSamplingConfig)
    label: RoundLabelConfig = field(RoundLabelConfig)
    dpo: DPORunConfig = field(round_dpo)  # train_dpo's keys; output_dir, policy and data.train are set per round
    rm: RMRunConfig = field(round_rm)  # train_rm's keys; output_dir, init_from and data.train are set per round

    def __post_init__(self):
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds}: must be >= 1")
        bad = [u for u in self.update if u not in UPDATES]
        if bad or not self.update or len(set(self.update)) != len(self.update):
            raise ConfigError(f"update={list(self.update)}: a non-empty list of distinct {list(UPDATES)}")
        for section in self.update:
            if not getattr(self, section).export.hf:
                raise ConfigError(f"{section}.export.hf=false: the next round starts from the round's {section}/hf")

    @property
    def judge(self) -> str:
        return self.label.judge or f"rm:{self.reward_model}"
