"""HuggingFace ↔ starling_jax weights, in parts: ONE declarative key table (`keys.py`) drives both import
(`read.py`) and export (`write.py`, with the one safetensors shard planner); the tokenizer half of an export is
`tokenizer.py`; output folders are written atomically by the path layer (`paths.atomic_folder`).

API
---
  load_hf(model, role, mesh, *, init_missing_head=False, seed=0, revision=None, **runtime)
      -> (cfg, graphdef, state)
  save_hf(folder, cfg, state, role, *, tokenizer_dir=None, template=None, extra_config=None,
          max_shard_bytes=5e9, overwrite=True, extra_files=()) -> Path
  key_table(cfg, role) -> list[KeySpec]     (the table; used by both directions and by tests)
  plan_shards(sizes, max_shard_size) -> huggingface_hub.StateDictSplit   (export and convert_starling)

`model` is a local folder, a URL (`gs://...`) or a Hub id, resolved by `hub.py::resolve` (URLs copied into the
local cache, Hub ids fetched without pickles into the HF cache; `HF_HUB_OFFLINE=1` reads the cache). `save_hf`'s
folder may be a URL too (written locally, then uploaded). `role` is "causal_lm" or "reward".
`runtime` are `ModelConfig` runtime overrides (dtype, param_dtype, scan_layers, remat_policy).
"""

from starling_jax.model.hf_io.keys import (
    HEAD_KEYS,
    IGNORED_SUFFIXES,
    NP_DTYPES,
    ROLES,
    TRUNK_PREFIXES,
    KeySpec,
    check_table_covers,
    key_table,
)
from starling_jax.model.hf_io.read import (
    INDEX_FILE,
    PICKLE_SUFFIXES,
    Weights,
    load_hf,
    read_hf_config,
    read_hf_tensors,
)
from starling_jax.model.hf_io.tokenizer import TOKENIZER_FILES, copy_tokenizer_files, write_tokenizer
from starling_jax.model.hf_io.write import (
    hf_config_dict,
    plan_shards,
    save_hf,
    write_safetensors,
)

__all__ = [
    "HEAD_KEYS",
    "IGNORED_SUFFIXES",
    "INDEX_FILE",
    "NP_DTYPES",
    "PICKLE_SUFFIXES",
    "ROLES",
    "TOKENIZER_FILES",
    "TRUNK_PREFIXES",
    "KeySpec",
    "Weights",
    "check_table_covers",
    "copy_tokenizer_files",
    "hf_config_dict",
    "key_table",
    "load_hf",
    "plan_shards",
    "read_hf_config",
    "read_hf_tensors",
    "save_hf",
    "write_safetensors",
    "write_tokenizer",
]
