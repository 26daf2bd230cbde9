"""The held-out reward of a round's policy, as `evaluate bon` measures it: K samples per held-out prompt (the same seed
every round, so rounds differ by their policy only), each scored by the chain's `reward_model` (`eval.policy`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from starling_jax.errors import ConfigError
from starling_jax.rounds.config import OnPolicyConfig


def sampling_args(cfg: OnPolicyConfig) -> dict:
    s = cfg.sampling
    return {
        "max_new_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "batch_size": s.batch_size,
        "template": s.template,
        "stops": list(s.stop),
    }


def heldout_reward(cfg: OnPolicyConfig, policy: str, conversations: list, folder: Path) -> dict:
    """The held-out reward of `policy`: K samples per held-out prompt (the same seed every round, so rounds differ
    by their policy only), each scored by `reward_model`; the mean over every scored answer."""
    from starling_jax.eval.policy import generate_answers, rm_rewards

    k = cfg.sampling.num_samples
    answers = generate_answers(
        policy, conversations, folder / "eval_samples.jsonl", {**sampling_args(cfg), "seed": cfg.seed}, k
    )
    rewards = rm_rewards(cfg.reward_model, conversations, answers, f"rm:{cfg.reward_model}", cfg.label.max_length)
    scored = [r for r in rewards if not isinstance(r, str)]
    if not scored:
        raise ConfigError(f"no held-out prompt could be scored by {cfg.reward_model}: {rewards[0]}")
    with (folder / "eval.jsonl.tmp").open("w", encoding="utf-8") as f:
        for i, (ans, r) in enumerate(zip(answers, rewards)):
            line = {"row": i + 1, "answers": ans, **({"error": r} if isinstance(r, str) else {"rewards": r})}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    (folder / "eval.jsonl.tmp").replace(folder / "eval.jsonl")
    flat = np.asarray([x for r in scored for x in r], np.float64)
    return {
        "status": "completed",
        "policy": str(policy),
        "reward_model": cfg.reward_model,
        "prompts": len(conversations),
        "prompts_scored": len(scored),
        "answers": int(flat.size),
        "heldout_reward": float(flat.mean()),
        "heldout_reward_sem": float(flat.std(ddof=1) / np.sqrt(flat.size)) if flat.size > 1 else 0.0,
        "output": str(folder / "eval.jsonl"),
    }
