"""Tiny models for the RL tests, built without compiling anything (eager or jitted NNX init of even a 4-layer model
costs tens of seconds on the shared 2-core CI machine), and the tiny HF policy / reward-model folders and chat
prompts file that the `train_ppo` tests run on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starling_jax.data.chat import to_hh
from starling_jax.data.tokenizer import default_tokenizer_dir
from starling_jax.model.config import ModelConfig
from starling_jax.model.create import abstract_model
from tests.model.hf_fixtures import make_hf_model

QUESTIONS = [
    "What is the capital of France?",
    "Name a colour.",
    "Tell me a joke.",
    "How are you?",
    "What is two plus two?",
    "Say hello.",
    "Who wrote Hamlet?",
    "Give me a number.",
]


def ppo_folders(root: Path, layers: int) -> tuple[Path, Path, Path]:
    """(policy, reward model, prompts file) under `root`: a random `layers`-layer Mistral policy and Llama reward
    model as HF folders with the Llama-2 chat tokenizer (32000 tokens), and 24 single-turn chat prompts (each
    question three times, numbered)."""
    tok = default_tokenizer_dir("llama2_chat")
    policy = make_hf_model(root / "policy", "mistral", head="lm", vocab=32000, layers=layers, sliding_window=4096)
    rm = make_hf_model(root / "rm", "llama", head="score", vocab=32000, layers=layers, seed=1)
    for folder in (policy, rm):
        for f in tok.iterdir():
            shutil.copy(f, folder / f.name)
    return policy, rm, write_prompts(root / "prompts.jsonl", repeats=3)


def write_prompts(path: Path, repeats: int) -> Path:
    """A chat prompts file: each of the 8 QUESTIONS `repeats` times, numbered."""
    path.write_text(
        "".join(
            json.dumps({"prompt": to_hh([{"role": "user", "content": f"{q} ({i})"}])}) + "\n"
            for i in range(repeats)
            for q in QUESTIONS
        )
    )
    return path


def narrow_policy(policy: Path, out: Path, tokens: range = range(1000, 1016), common: float = 3.0, lift: float = 1.7):
    """A copy of the random policy folder at `out` that samples almost only from `tokens` (98%): a reward model's
    preferences among 16 tokens are learnable in a few updates, among 32000 they are not. Every token embedding
    gets a shared direction c of `common` times their mean norm, which then dominates the last hidden state, and the
    output rows of `tokens` point along c: their logits sit ~12 above the rest (`lift` · |h| · cos)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(policy, out)
    path = out / "model.safetensors"
    weights = load_file(path)
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    rng = np.random.default_rng(0)
    c = rng.normal(size=embed.shape[1]).astype(embed.dtype)
    c /= np.linalg.norm(c)
    embed += common * np.linalg.norm(embed, axis=1).mean() * c
    head[np.asarray(tokens)] += lift * c
    save_file(weights, path, metadata={"format": "pt"})
    return out


def _names(path) -> tuple[str, ...]:
    """('decoder', 'layers', '0', 'attn', 'q_proj') from a pytree key path (the Variable's `.value` dropped)."""
    return tuple(str(p.key) for p in path if hasattr(p, "key"))


def tiny_model(cfg: ModelConfig, role: str, seed: int = 0) -> nnx.Module:
    """Random weights drawn by numpy: N(0, 0.02²) matrices, RMSNorm scales 1 + N(0, 0.1²)."""
    graphdef, abstract = abstract_model(cfg, role)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        values = (
            (1.0 + rng.normal(0.0, 0.1, leaf.shape))
            if _names(path)[-1] == "scale"
            else rng.normal(0.0, 0.02, leaf.shape)
        )
        return jnp.asarray(values, leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, abstract))


def perturb(model: nnx.Module, keep, scale: float = 0.05, seed: int = 1) -> None:
    """Adds N(0, scale²) noise (numpy) to every parameter whose path (a tuple of str) `keep(path)` rejects; for
    stacked layers `keep` may instead return a boolean row mask over the stacked axis (True = unchanged rows)."""
    rng = np.random.default_rng(seed)

    def bump(path, x):
        kept = keep(_names(path))
        if kept is True:
            return x
        noise = rng.normal(0.0, scale, x.shape)
        if kept is not False:
            noise[np.asarray(kept)] = 0.0
        return x + jnp.asarray(noise, x.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(bump, nnx.state(model, nnx.Param)))
