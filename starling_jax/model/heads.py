"""Heads and roles: every role is the one decoder trunk plus a small head.

  CausalLM     decoder + LM head (tied or untied)        → logits [N, L, V]   (policy, reference)
  RewardModel  decoder + scalar `score` head (no bias)   → scores [N, L]      (reward model, critic)

A reward is the score at an explicit `reward_index` (the last token of the rendered conversation), never found
from a pad id. A critic reads the same per-token scores as values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from starling_jax.errors import ConfigError
from starling_jax.model.config import ModelConfig
from starling_jax.model.decoder import Decoder, _init
from starling_jax.parallel.sharding import constrain


class LMHead(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.kernel = _init(cfg, rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))

    def __call__(self, hidden):
        return hidden @ self.kernel[...].astype(hidden.dtype)


class ScalarHead(nnx.Module):
    """`score = hidden · w`, w: [D, 1], no bias (the layout of HF `*ForSequenceClassification` with num_labels=1)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kernel = _init(cfg, rngs, (cfg.hidden_size, 1), ("embed", "score"))

    def __call__(self, hidden):
        return (hidden.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32))[..., 0]


class CausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.decoder = Decoder(cfg, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = LMHead(cfg, rngs)

    def __call__(self, tokens, positions, segment_ids):
        """→ logits [N, L, V], float32."""
        return self.logits(self.decoder(tokens, positions, segment_ids))

    def logits(self, hidden):
        """hidden [N, L, D] → logits [N, L, V], float32 (the tied or untied LM head)."""
        if self.cfg.tie_word_embeddings:
            logits = hidden @ self.decoder.embed[...].astype(hidden.dtype).T
        else:
            logits = self.lm_head(hidden)
        return constrain(logits.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))


class RewardModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.decoder = Decoder(cfg, rngs)
        self.score = ScalarHead(cfg, rngs)

    def __call__(self, tokens, positions, segment_ids):
        """→ per-token scores [N, L], float32."""
        return self.score(self.decoder(tokens, positions, segment_ids))

    def rewards(self, tokens, positions, segment_ids, reward_index):
        """→ rewards [N]: the score at `reward_index` [N] of each sequence (the decoder's last layer computes only
        that token's row, `Decoder.__call__(select=...)`)."""
        hidden = self.decoder(tokens, positions, segment_ids, select=reward_index[:, None])  # [N, 1, D]
        return self.score(hidden)[:, 0]


@dataclasses.dataclass(frozen=True)
class Role:
    """One entry of the role registry, which heads, HF import/export (`hf_io`) and checkpoints all read."""

    name: str
    module: type  # the nnx.Module: decoder trunk + head
    hf_suffix: str  # HF class = {Mistral,Llama} + this
    head: str  # the head's top-level variable (besides `decoder`)


# causal_lm: policy, reference (tied heads keep no `lm_head`); reward: reward model, critic.
ROLES: dict[str, Role] = {
    "causal_lm": Role("causal_lm", CausalLM, "ForCausalLM", "lm_head"),
    "reward": Role("reward", RewardModel, "ForSequenceClassification", "score"),
}


def get_role(role: str) -> Role:
    if role not in ROLES:
        raise ConfigError(f"model role {role!r}: choose one of {sorted(ROLES)}")
    return ROLES[role]


def role_class(role: str):
    return get_role(role).module


def build_model(cfg: ModelConfig, role: str, seed: int = 0) -> nnx.Module:
    """An unsharded model on the default device (tests, tiny models). Sharded creation: `model/create.py`."""
    return role_class(role)(cfg, nnx.Rngs(params=seed))


def kwise_rewards(model: RewardModel, batch: dict) -> jax.Array:
    """Scores all K answers of every prompt in one forward pass → rewards [B, K].

    Per-answer batch: arrays [B, K, L], the reward at `reward_index` [B, K] of each sequence. Packed batch
    (data/layout.py: packed and/or shared-prefix rows): arrays [R, L], the reward of answer (b, k) at row
    `reward_row[b, k]`, column `reward_index[b, k]`."""
    if batch["tokens"].ndim == 2:
        scores = model(batch["tokens"], batch["positions"], batch["segment_ids"])  # [R, L]
        return scores[batch["reward_row"], batch["reward_index"]]
    b, k, length = batch["tokens"].shape
    flat = lambda x: x.reshape(b * k, length)
    rewards = model.rewards(
        flat(batch["tokens"]),
        flat(batch["positions"]),
        flat(batch["segment_ids"]),
        batch["reward_index"].reshape(b * k),
    )
    return rewards.reshape(b, k)
