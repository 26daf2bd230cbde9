"""Tiny random HuggingFace Mistral/Llama folders (transformers + torch) and helpers to compare against them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def require_torch():
    """The parity suite's references (PyTorch + transformers, the `dev` extra). A missing torch FAILS the module
    at collection (an error in CI's summary), never a silent skip that would let parity go unchecked."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"the HF parity suite needs PyTorch and transformers ({e}); install the dev extra: pip install -e '.[dev]'"
        ) from e
    return torch


PAD = 0  # padding id of every fixture; real tokens are drawn from 1..V-1 so HF's pad search is unambiguous


def hf_config_dict(
    kind: str = "mistral",
    *,
    gqa: bool = True,
    tied: bool = False,
    sliding_window: int | None = 5,
    vocab: int = 256,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    inter: int = 128,
    rope_theta: float = 10000.0,
) -> dict:
    cfg = {
        "model_type": kind,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 2 if gqa else heads,
        "head_dim": hidden // heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "max_position_embeddings": 128,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": PAD,
        "hidden_act": "silu",
    }
    if kind == "mistral":
        cfg["sliding_window"] = sliding_window
    return cfg


def make_hf_model(
    folder: str | Path, kind: str = "mistral", head: str = "lm", seed: int = 0, dtype: str = "float32", **config_kwargs
) -> Path:
    """Saves a random tiny `*ForCausalLM` (head="lm") or `*ForSequenceClassification` (head="score") folder.

    Weights are re-drawn with O(1) activations (std 1/sqrt(fan-in)-ish, norms around 1) so that parity checks are
    not trivially satisfied by near-zero logits.
    """
    import torch
    import transformers

    folder = Path(folder)
    hf = hf_config_dict(kind, **config_kwargs)
    config_cls = {"mistral": transformers.MistralConfig, "llama": transformers.LlamaConfig}[kind]
    config = config_cls(**hf)
    prefix = "Mistral" if kind == "mistral" else "Llama"
    if head == "lm":
        model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    else:
        config.num_labels = 1
        model_cls = getattr(transformers, f"{prefix}ForSequenceClassification")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm scales
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1]))
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def random_batch(seed: int = 0, n: int = 3, length: int = 12, vocab: int = 256, lengths=None):
    """Right-padded int32 batch: tokens [N, L] (pad 0), positions, segment_ids, lengths."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths if lengths is not None else [length, length - 3, length // 2][:n], np.int32)
    tokens = rng.integers(1, vocab, (len(lengths), length)).astype(np.int32)
    ar = np.arange(length)[None, :]
    real = ar < lengths[:, None]
    tokens = np.where(real, tokens, PAD).astype(np.int32)
    positions = np.where(real, ar, 0).astype(np.int32)
    segment_ids = real.astype(np.int32)
    return tokens, positions, segment_ids, lengths


def hf_outputs(folder: str | Path, tokens: np.ndarray, lengths: np.ndarray, head: str = "lm"):
    """transformers PyTorch (float32, eager attention) logits [N, L, V] or pooled scores [N]."""
    import torch
    import transformers

    cls = transformers.AutoModelForCausalLM if head == "lm" else transformers.AutoModelForSequenceClassification
    model = cls.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()
    mask = (np.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)), attention_mask=torch.from_numpy(mask))
    logits = out.logits.float().numpy()
    return logits[:, :, :] if head == "lm" else logits[:, 0]


def rewrite_config(folder: str | Path, **changes) -> None:
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def forward(
    cfg, graphdef, state, tokens, positions, segment_ids, role: str = "causal_lm", mesh=None, reward_index=None
):
    """Jitted starling_jax forward (activation constraints on `mesh` when given) → numpy."""
    import jax
    from flax import nnx

    from starling_jax.parallel.sharding import activation_sharding

    @jax.jit
    def run(state, tokens, positions, segment_ids, reward_index):
        model = nnx.merge(graphdef, state)
        if role == "causal_lm":
            return model(tokens, positions, segment_ids)
        if reward_index is None:
            return model(tokens, positions, segment_ids)
        return model.rewards(tokens, positions, segment_ids, reward_index)

    with activation_sharding(mesh):
        out = run(state, tokens, positions, segment_ids, reward_index)
    return np.asarray(out)


_CACHE: dict = {}


def cached_model(tmp_path_factory, kind: str = "mistral", head: str = "lm", **kwargs) -> Path:
    """One folder per distinct (kind, head, kwargs) for the whole test session (torch model creation is slow)."""
    key = (kind, head, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        folder = tmp_path_factory.mktemp(f"hf_{kind}_{head}")
        _CACHE[key] = make_hf_model(folder, kind, head, **kwargs)
    return _CACHE[key]


def one_device_mesh():
    import jax

    from starling_jax.parallel.sharding import MeshConfig, make_mesh

    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
