"""Model architectures without their weights: a local folder's config.json, the built-in table of the Hub models the
recipes start from (the Hub may be unreachable where `aot` runs), else the Hub's config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from starling_jax.errors import CheckpointError
from starling_jax.model.config import ModelConfig

# HF config.json of the Hub models the recipes start from (the Hub may be unreachable where this runs).
_LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "initializer_range": 0.02,
}


_MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "initializer_range": 0.02,
}


KNOWN_HF_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-chat-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
    "berkeley-nest/Starling-RM-7B-alpha": {**_LLAMA2_7B, "architectures": ["LlamaForSequenceClassification"]},
    "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    "openchat/openchat_3.5": {
        **_MISTRAL_7B,
        "vocab_size": 32002,
        "max_position_embeddings": 8192,
        "eos_token_id": 32000,
    },
    "berkeley-nest/Starling-LM-7B-alpha": {
        **_MISTRAL_7B,
        "vocab_size": 32002,
        "max_position_embeddings": 8192,
        "eos_token_id": 32000,
    },
    "openchat/openchat-3.5-0106": {
        **_MISTRAL_7B,
        "vocab_size": 32002,
        "max_position_embeddings": 8192,
        "eos_token_id": 32000,
    },
    # Yi-34B-Chat's trunk (Llama architecture, GQA 56/8) with the scalar head
    "Nexusflow/Starling-RM-34B": {
        "architectures": ["LlamaForSequenceClassification"],
        "model_type": "llama",
        "vocab_size": 64000,
        "hidden_size": 7168,
        "intermediate_size": 20480,
        "num_hidden_layers": 60,
        "num_attention_heads": 56,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 5000000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.02,
    },
}


def architecture(source: str, key: str, **runtime):
    """A model's architecture without its weights: `source` is a local folder's config.json, else the built-in
    table of known Hub configs, else the Hub's config.json (`key` names the config field in errors)."""
    if Path(source).expanduser().is_dir():
        return ModelConfig.from_hf_folder(Path(source).expanduser(), **runtime)
    if source in KNOWN_HF_CONFIGS:
        return ModelConfig.from_hf_dict(KNOWN_HF_CONFIGS[source], source=f"{source} (built-in)", **runtime)
    return ModelConfig.from_hf_dict(_hub_config(source, key), source=f"{source}/config.json", **runtime)


def _hub_config(model_id: str, key: str = "init_from") -> dict:
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model_id, "config.json")).read_text())
    except Exception as e:
        raise CheckpointError(
            f"{key}={model_id}: not a local folder, not in the built-in table {sorted(KNOWN_HF_CONFIGS)}, and "
            f"its config.json could not be fetched ({type(e).__name__}); pass a local folder holding config.json"
        ) from None
