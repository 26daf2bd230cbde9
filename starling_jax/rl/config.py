"""The RL run config: `python -m starling_jax.train_ppo [CONFIG.yaml] [key=value ...]` fills `PPORunConfig` from
these defaults (the embedded CPU demo on the default `train_sft` policy and `train_rm` reward model), then the YAML
file, then the overrides. `configs/ppo_openchat35_starling_alpha.yaml` and `configs/ppo_openchat35_beta.yaml` are
the Starling recipes."""

from __future__ import annotations

import dataclasses

from starling_jax.config import field
from starling_jax.data.chat import TEMPLATE_NAMES
from starling_jax.data.synthetic import BUNDLED_ALIAS
from starling_jax.errors import ConfigError
from starling_jax.model.attention import check_layout
from starling_jax.parallel.sharding import MeshConfig
from starling_jax.rl.experience import AdvantageConfig
from starling_jax.rl.kl import KLConfig
from starling_jax.rl.losses import ALGORITHMS, CRITIC_FREE, LossConfig
from starling_jax.rl.rewards import RewardConfig
from starling_jax.train.job import ExportConfig, TrainConfig
from starling_jax.train.optimizer import OptimConfig
from starling_jax.train.runtime import RLRuntimeConfig

DEFAULT_PPO_DIR = "runs/ppo_default"
DEFAULT_POLICY = "runs/sft_default/hf"
DEFAULT_REWARD_MODEL = "runs/rm_default/hf"
CRITIC_INITS = ("reward", "policy")
DEFAULT_GROUP_SIZE = {"ppo": 1, "apa": 1, "grpo": 4, "rloo": 4}  # rollout.group_size=0 resolves to these


@dataclasses.dataclass
class PromptConfig:
    train: str = BUNDLED_ALIAS  # Nectar-schema file (its HH `prompt` column) or JSON lines of {"messages": [...]}
    eval_prompts: int = 16  # held-out prompts (a seeded split) whose rollouts measure the reward
    template: str = "tokenizer"  # the policy's chat format: its tokenizer's own, or a named template
    rm_template: str = "tokenizer"  # the reward model's chat format (re-rendering path)
    max_prompt_tokens: int = 64  # prompts are cut from the left to this; the sampler's prompt bucket
    rm_max_length: int = 256  # tokens the reward model reads per re-rendered conversation

    def __post_init__(self):
        for key in ("template", "rm_template"):
            if getattr(self, key) not in TEMPLATE_NAMES:
                raise ConfigError(f"prompts.{key}={getattr(self, key)!r}: choose one of {list(TEMPLATE_NAMES)}")
        if self.eval_prompts < 1 or self.max_prompt_tokens < 2:
            raise ConfigError("prompts.eval_prompts must be >= 1 and prompts.max_prompt_tokens >= 2")


@dataclasses.dataclass
class RolloutConfig:
    batch_size: int = 16  # rollouts (answers) per iteration, = prompts × group_size (Starling: 64)
    # answers per prompt, distinct draws (grpo / rloo: >= 2, their baseline); 0 = 1 for ppo/apa, 4 for grpo/rloo
    group_size: int = 0
    minibatch_size: int = 8  # rows (answers) per optimizer update
    epochs: int = 2  # passes over each rollout batch (Starling: 2)
    max_new_tokens: int = 24  # Starling: 1024
    temperature: float = 1.0
    top_k: int = 0  # 0 = off (Starling: 0)
    top_p: float = 1.0  # 1 = off (Starling: 1)
    stop_strings: list[str] = field(list)  # e.g. ["GPT4 Correct User:"] (Starling)

    def __post_init__(self):
        if self.batch_size < 1 or self.minibatch_size < 1 or self.epochs < 1 or self.max_new_tokens < 1:
            raise ConfigError("rollout.batch_size, minibatch_size, epochs and max_new_tokens must be >= 1")
        if self.group_size < 0:
            raise ConfigError(f"rollout.group_size={self.group_size}: must be >= 1 (or 0: the algorithm's default)")
        if self.batch_size % self.minibatch_size:
            raise ConfigError(
                f"rollout.batch_size={self.batch_size} is not a multiple of "
                f"rollout.minibatch_size={self.minibatch_size}"
            )


@dataclasses.dataclass
class PPORunConfig:
    output_dir: str = DEFAULT_PPO_DIR
    seed: int = 0  # fixes the prompt order, the rollouts' sampling keys and the minibatch order
    algorithm: str = "ppo"  # ppo | apa | grpo | rloo (grpo / rloo: no critic, the group of answers is the baseline)
    policy: str = DEFAULT_POLICY  # HF causal-LM folder, gs:// URL or Hub id (actor and reference start here)
    reward_model: str = DEFAULT_REWARD_MODEL  # HF reward-model folder, gs:// URL or Hub id (frozen)
    # true: the policy's tokens are scored as they are (checked: same vocabulary and chat template); false: the
    # completions are decoded and re-rendered in the reward model's format and tokenizer (Starling-alpha)
    reward_model_shares_tokenizer: bool = False
    # policy (trunk + a new value head) | reward (OpenRLHF; needs a shared tokenizer); ppo / apa only
    critic_init: str = "policy"
    # -1: every layer trains and the reference is a full frozen copy; N ≥ 1: only the top N layers (+ final norm,
    # LM head) train and the reference is a hydra top on the actor's shared bottom (Starling: 4)
    num_layers_unfrozen: int = -1
    critic_layers_unfrozen: int = -1  # the critic's trainable top layers (-1: all); ppo / apa only
    # dtypes, remat, scan and attention of every model (the HF folders fix the architectures), train/runtime.py
    runtime: RLRuntimeConfig = field(RLRuntimeConfig)
    prompts: PromptConfig = field(PromptConfig)
    rollout: RolloutConfig = field(RolloutConfig)
    # β 0.3 (not Starling's 0.01): at lr 1e-3 the demo's KL ran away with β 0.05 (held-out kl_end 6.9 nats per
    # sequence) and 0.15 (5.4); 0.3 ended at 3.5 with the reward still up −2.58 → 0.65 (BENCHMARKS, "Embedded RL
    # default chain"). The recipes set Starling's 0.01.
    kl: KLConfig = field(lambda: KLConfig(coef=0.3))
    # The demo's critic is a fresh value head (≈ 0) and the RM's raw scores are not centred (the default RM's sit
    # around −0.5): with Starling's `running_std` and no whitening every advantage of the first iterations has the
    # same sign, PPO/APA then push down (or up) every sampled token alike and the held-out reward did not rise
    # (tests/rl's tiny fixture: −0.552 → −0.584 in 6 iterations). Centring the scores and whitening the advantages fixes
    # that; the Starling
    # recipes set Starling's own choices.
    reward: RewardConfig = field(lambda: RewardConfig(normalize="running"))
    advantage: AdvantageConfig = field(lambda: AdvantageConfig(whiten=True))
    loss: LossConfig = field(LossConfig)
    mesh: MeshConfig = field(MeshConfig)
    optim: OptimConfig = field(lambda: OptimConfig(learning_rate=1e-3, schedule="constant", b2=0.95, max_grad_norm=1.0))
    train: TrainConfig = field(lambda: TrainConfig(steps=30, eval_every=10, save_every=10, log_every=1))
    export: ExportConfig = field(ExportConfig)

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm={self.algorithm!r}: choose one of {list(ALGORITHMS)}")
        if self.critic_init not in CRITIC_INITS:
            raise ConfigError(f"critic_init={self.critic_init!r}: choose one of {list(CRITIC_INITS)}")
        self._check_algorithm()
        if self.num_layers_unfrozen == 0 or self.num_layers_unfrozen < -1:
            raise ConfigError(f"num_layers_unfrozen={self.num_layers_unfrozen}: -1 (all) or N >= 1")
        if self.optim.freeze_layers:
            raise ConfigError(
                f"optim.freeze_layers={self.optim.freeze_layers} does not apply to train_ppo: set "
                "num_layers_unfrozen=N (only the top N policy layers train) and critic_layers_unfrozen"
            )
        # rollouts: a left-padded prompt and its completion, one segment per row (rl/experience.py)
        check_layout(self.runtime.attention_impl, "left_padded", what="the rollouts' left-padded rows")

    def _check_algorithm(self) -> None:
        """Resolves rollout.group_size=0 to the algorithm's default and refuses what does not apply to it."""
        r, algorithm = self.rollout, self.algorithm
        if r.group_size == 0:
            r.group_size = DEFAULT_GROUP_SIZE[algorithm]
        if algorithm in CRITIC_FREE and r.group_size < 2:
            raise ConfigError(
                f"rollout.group_size={r.group_size}: algorithm={algorithm} needs >= 2 answers per prompt (its baseline)"
            )
        if r.batch_size % r.group_size:
            raise ConfigError(
                f"rollout.batch_size={r.batch_size} is not a multiple of rollout.group_size={r.group_size} "
                "(batch_size counts answers: prompts × group_size)"
            )
        if algorithm in CRITIC_FREE:
            if self.critic_init != "policy" or self.critic_layers_unfrozen != -1:
                raise ConfigError(
                    f"critic_init / critic_layers_unfrozen: algorithm={algorithm} has no critic (leave them unset)"
                )
            if self.advantage.scale_for(algorithm) == "group" and algorithm == "rloo":
                raise ConfigError("advantage.scale_rewards=group: rloo takes none or batch")
        elif self.kl.in_loss and algorithm == "apa":
            raise ConfigError(
                "kl.in_loss=true: apa keeps the KL in the reward (ppo, grpo and rloo take it in the loss)"
            )
