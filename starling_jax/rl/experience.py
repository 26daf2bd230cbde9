"""Experience: from a rollout batch to the arrays PPO/APA train on, and the minibatch loss of the update.

Rollout layout (what the sampler returns, concatenated): tokens [B, P + T] = LEFT-padded prompt [B, P] followed by
the completion [B, T] (right-padded with pad ids after each row's end; a row with a stop string cut to its answer +
EOS first, `rl/stops.py`); positions count 0..n−1 over each row's real
tokens; segment_ids are 1 on real tokens (prompt and generated), 0 on padding. Response token j of every row sits
at the same index P + j, so per-response-token quantities are static slices of the forward (no gather):

  logprob_j = log softmax(logits[:, P − 1 + j])[tokens[:, P + j]]       (the token's log-prob given its prefix)
  value_j   = critic score at index P − 1 + j                          (the state before emitting token j)

The padding rule of the decoder (attention only within segment 1, causal, window by index = position difference)
makes this layout exact with the mask-based attention (`attention_impl=einsum`).

`make_experience` (no gradient): actor log-probs (π_old), reference log-probs (a hydra top or a full copy), critic
values, per-token KL, shaped scores, per-token rewards, GAE advantages and returns — the formulas of `kl.py`,
`rewards.py` and `advantages.py`. `minibatch_loss`: the actor and critic forwards of the update and
`losses.actor_critic_loss`.

GRPO / RLOO (no critic): the batch holds G = rollout.group_size answers per prompt, rows b = g·G + j (prompt g,
answer j). With s_b the shaped score of answer b (`rewards.shape_scores`), the group advantage a_b
(`group_advantages`):

  GRPO  a_b = (s_b − mean_g) / (σ + ε),  σ by `advantage.scale_rewards`:
          group  the unbiased std of the answer's group         (trl's default)
          batch  the unbiased std of the whole batch's scores   (trl `scale_rewards="batch"`)
          none   no division: a_b = s_b − mean_g                (Dr. GRPO)
  RLOO  a_b = s_b − (Σ_{j'≠j} s_{g,j'}) / (G − 1)              (leave-one-out mean of the other G − 1 answers)
          scale_rewards batch: then (a − mean(a)) / (std(a) + ε) over the batch (trl `normalize_advantages`)

ε = `advantage.eps` (trl: 1e-4); G = 1 (evaluation) gives a_b = 0, as trl. The per-token advantage is the reward-to-go
of r_{b,t} = −β·kl_{b,t}·m_{b,t} + a_b·[t = n_b − 1] (`rewards.token_rewards`, γ = λ = 1, no value):

  A_{b,t} = a_b − β Σ_{t' ≥ t} kl_{b,t'}     (OpenRLHF's GRPO / RLOO with the KL in the reward)

so with `kl.in_loss` (β = 0 here; the KL is in the loss) a_b is broadcast over every answer token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from starling_jax.errors import ConfigError
from starling_jax.model.hydra import actor_logits, hydra_logits
from starling_jax.rl import advantages as adv_lib
from starling_jax.rl import kl as kl_lib
from starling_jax.rl import rewards as rewards_lib
from starling_jax.rl.losses import CRITIC_FREE, LossConfig, actor_critic_loss, token_entropy

Array = jax.Array

SCALE_REWARDS = ("auto", "group", "batch", "none")


@dataclasses.dataclass
class AdvantageConfig:
    gamma: float = 1.0  # PPO/APA's GAE γ (Starling: 1)
    lam: float = 0.95  # PPO/APA's GAE λ (Starling: 0.95)
    whiten: bool = False  # PPO/APA: whiten the advantages over the batch (Starling: no)
    # GRPO/RLOO's group advantage (module docstring): group | batch | none; auto = group for grpo, none for rloo
    scale_rewards: str = "auto"
    eps: float = 1e-4  # GRPO/RLOO: ε of (s − mean) / (σ + ε) (trl: 1e-4)

    def __post_init__(self):
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"rl.advantage: gamma={self.gamma} and lam={self.lam} must lie in [0, 1]")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"advantage.scale_rewards={self.scale_rewards!r}: choose one of {list(SCALE_REWARDS)}")
        if self.eps < 0:
            raise ConfigError(f"advantage.eps={self.eps}: must be >= 0")

    def scale_for(self, algorithm: str) -> str:
        """The scale_rewards `auto` resolves to: group for grpo, none for rloo (trl's defaults)."""
        if self.scale_rewards != "auto":
            return self.scale_rewards
        return "group" if algorithm == "grpo" else "none"


def _unbiased_std(x: Array, axis=None, keepdims: bool = False) -> Array:
    """sqrt(Σ (x − x̄)² / (n − 1)) (torch's and trl `nanstd`'s Bessel-corrected std)."""
    n = x.size if axis is None else x.shape[axis]
    squares = jnp.sum(jnp.square(x - jnp.mean(x, axis=axis, keepdims=True)), axis=axis, keepdims=keepdims)
    return jnp.sqrt(squares / (n - 1))


def grpo_advantages(scores: Array, group_size: int, scale_rewards: str = "group", eps: float = 1e-4) -> Array:
    """GRPO: a_b = (s_b − mean_g) / (σ + ε), σ the unbiased std of the group (`group`) or of the batch (`batch`);
    `none`: a_b = s_b − mean_g. scores [B] (B a multiple of G, rows b = g·G + j) → [B] float32; G = 1 → 0."""
    s = scores.astype(jnp.float32)
    if group_size == 1:
        return jnp.zeros_like(s)
    grouped = s.reshape(-1, group_size)
    centred = (grouped - jnp.mean(grouped, axis=1, keepdims=True)).reshape(-1)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = jnp.repeat(_unbiased_std(grouped, axis=1), group_size)
    elif scale_rewards == "batch":
        std = _unbiased_std(s)
    else:
        raise ConfigError(f"advantage.scale_rewards={scale_rewards!r}: choose one of group, batch, none")
    return centred / (std + eps)


def rloo_advantages(scores: Array, group_size: int, scale_rewards: str = "none", eps: float = 1e-4) -> Array:
    """RLOO: a_b = s_b − (Σ_{j'≠j} s_{g,j'}) / (G − 1) (the leave-one-out mean of the other answers to the prompt);
    `batch`: then (a − mean(a)) / (std(a) + ε) over the batch (trl `normalize_advantages`). scores [B] → [B]; G = 1 → 0
    (before the optional batch scaling)."""
    s = scores.astype(jnp.float32)
    if group_size == 1:
        adv = jnp.zeros_like(s)
    else:
        grouped = s.reshape(-1, group_size)
        baseline = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (group_size - 1)
        adv = (grouped - baseline).reshape(-1)
    if scale_rewards == "batch":
        return (adv - jnp.mean(adv)) / (_unbiased_std(adv) + eps)
    if scale_rewards != "none":
        raise ConfigError(f"advantage.scale_rewards={scale_rewards!r}: rloo takes none or batch")
    return adv


def group_advantages(scores: Array, algorithm: str, group_size: int, scale_rewards: str, eps: float) -> Array:
    """The sequence advantage a_b of `algorithm` (grpo | rloo) from its group (module docstring)."""
    fn = grpo_advantages if algorithm == "grpo" else rloo_advantages
    return fn(scores, group_size, scale_rewards, eps)


def reward_to_go(rewards: Array, mask: Array) -> Array:
    """A_t = Σ_{t' ≥ t} r_{t'} · m_{t'} (γ = 1, no value): rewards, mask [B, T] → [B, T], 0 on padding."""
    m = mask.astype(jnp.float32)
    r = rewards.astype(jnp.float32) * m
    return jnp.flip(jnp.cumsum(jnp.flip(r, axis=-1), axis=-1), axis=-1) * m


def response_logprobs(logits: Array, tokens: Array, prompt_len: int) -> tuple[Array, Array]:
    """logits [B, P+T, V], tokens [B, P+T] → (log-prob of each response token [B, T], entropy of the policy at
    each response step [B, T]), float32 (module docstring)."""
    step_logits = logits[:, prompt_len - 1 : -1].astype(jnp.float32)
    logp = jax.nn.log_softmax(step_logits, axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, prompt_len:, None].astype(jnp.int32), axis=-1)[..., 0]
    return chosen, token_entropy(step_logits)


def response_values(scores: Array, prompt_len: int) -> Array:
    """Critic per-token scores [B, P+T] → values of the states before each response token [B, T]."""
    return scores[:, prompt_len - 1 : -1].astype(jnp.float32)


def rollout_forward(actor, reference, critic, batch: dict, prompt_len: int, hydra: bool) -> dict[str, Array]:
    """One no-gradient pass: actor and reference log-probs and critic values [B, T] (no values when `critic` is
    None: grpo / rloo). `hydra`: the reference is a `ReferenceTop` on the actor's shared bottom (one bottom pass);
    else a full frozen `CausalLM` copy."""
    inputs = (batch["tokens"], batch["positions"], batch["segment_ids"])
    if hydra:
        actor_logits, ref_logits = hydra_logits(actor, reference, *inputs)
    else:  # a full frozen copy of the initial policy
        actor_logits, ref_logits = actor(*inputs), reference(*inputs)
    logprobs, entropy = response_logprobs(actor_logits, batch["tokens"], prompt_len)
    ref_logprobs, _ = response_logprobs(ref_logits, batch["tokens"], prompt_len)
    out = {"logprobs": logprobs, "ref_logprobs": ref_logprobs, "entropy": entropy}
    if critic is not None:
        out["values"] = response_values(critic(*inputs), prompt_len)
    return jax.lax.stop_gradient(out)


def make_experience(
    forward: dict[str, Array],
    mask: Array,
    raw_scores: Array,
    ended_with_eos: Array,
    kl_coef: Array,
    reward_stats: rewards_lib.RewardStats,
    *,
    kl_cfg: kl_lib.KLConfig,
    reward_cfg: rewards_lib.RewardConfig,
    adv_cfg: AdvantageConfig,
    reward_mean: float | None = None,
    reward_std: float | None = None,
    valid: Array | None = None,
    algorithm: str = "ppo",
    group_size: int = 1,
    kl_in_loss: bool = False,
) -> tuple[dict[str, Array], rewards_lib.RewardStats, dict[str, Array]]:
    """Rollout forward + RM scores → (experience [B, T] arrays, updated reward statistics, rollout metrics).

    `valid` [B] marks real rows (padding rows of a fixed-shape batch get a zero mask). grpo / rloo: the rows are
    groups of `group_size` answers (module docstring), no values, and the experience has no old_values / returns;
    `kl_in_loss`: no KL penalty in the rewards (the loss has it)."""
    m = mask.astype(jnp.float32)
    if valid is not None:
        m = m * valid.astype(jnp.float32)[:, None]
    per_token_kl = kl_lib.kl_estimator(kl_cfg.estimator)(forward["logprobs"], forward["ref_logprobs"]) * m
    scores, reward_stats = rewards_lib.shape_scores(
        reward_cfg, raw_scores, ended_with_eos, reward_stats, reward_mean, reward_std, valid
    )
    penalty_coef = jnp.zeros_like(kl_coef) if kl_in_loss else kl_coef
    experience = {"old_logprobs": forward["logprobs"], "ref_logprobs": forward["ref_logprobs"], "mask": m}
    if algorithm in CRITIC_FREE:
        seq_adv = group_advantages(scores, algorithm, group_size, adv_cfg.scale_for(algorithm), adv_cfg.eps)
        advantages = reward_to_go(rewards_lib.token_rewards(seq_adv, per_token_kl, m, penalty_coef), m)
        returns = advantages
    else:
        rewards = rewards_lib.token_rewards(scores, per_token_kl, m, penalty_coef)
        advantages, returns = adv_lib.gae(rewards, forward["values"], m, adv_cfg.gamma, adv_cfg.lam)
        if adv_cfg.whiten:
            advantages = adv_lib.whiten(advantages, m)
        experience.update(old_values=forward["values"], returns=returns)
    experience["advantages"] = advantages
    rows = jnp.ones_like(raw_scores, jnp.float32) if valid is None else valid.astype(jnp.float32)
    n_rows = jnp.maximum(jnp.sum(rows), 1.0)
    seq_kl = kl_lib.sequence_kl(per_token_kl, m)
    metrics = {
        "score_raw": jnp.sum(raw_scores * rows) / n_rows,
        "score": jnp.sum(scores * rows) / n_rows,
        "kl": jnp.sum(seq_kl * rows) / n_rows,
        "kl_k3": jnp.sum(kl_lib.sequence_kl(kl_lib.kl_k3(forward["logprobs"], forward["ref_logprobs"]), m) * rows)
        / n_rows,
        "kl_coef": kl_coef,
        "entropy": adv_lib.masked_mean(forward["entropy"], m),
        "response_length": jnp.sum(m) / n_rows,
        "return_mean": adv_lib.masked_mean(returns, m),
        "advantage_mean": adv_lib.masked_mean(advantages, m),
    }
    if "values" in forward:
        metrics["value_mean"] = adv_lib.masked_mean(forward["values"], m)
    return experience, reward_stats, metrics


def minibatch_loss(
    params: dict,
    minibatch: dict[str, Array],
    *,
    graphdefs: dict,
    loss_cfg: LossConfig,
    algorithm: str,
    prompt_len: int,
    frozen_layers: int = 0,
    kl_coef: Array | float = 0.0,
    kl_in_loss: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """params {"actor", "critic"} ({"actor"} for grpo / rloo) → the loss of one minibatch (inputs + experience
    arrays). `frozen_layers`: the actor's bottom layers that never train (their backward pass is skipped);
    `kl_coef`, `kl_in_loss`: β and whether β·k3 joins the loss (`losses.py`)."""
    actor = nnx.merge(graphdefs["actor"], params["actor"])
    inputs = (minibatch["tokens"], minibatch["positions"], minibatch["segment_ids"])
    logits = actor_logits(actor, *inputs, frozen_layers) if frozen_layers else actor(*inputs)
    logprobs, entropy = response_logprobs(logits, minibatch["tokens"], prompt_len)
    values = None
    if "critic" in params:
        critic = nnx.merge(graphdefs["critic"], params["critic"])
        values = response_values(critic(*inputs), prompt_len)
    return actor_critic_loss(loss_cfg, algorithm, logprobs, entropy, values, minibatch, kl_coef, kl_in_loss)
