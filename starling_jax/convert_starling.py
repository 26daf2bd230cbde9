"""Convert the released Starling-RM-7B-alpha weights into a safetensors `LlamaForSequenceClassification` folder.

    python -m starling_jax.convert_starling [--input FILE_OR_DIR_OR_HUB_ID] [--base DIR_OR_HUB_ID] [--output HF_DIR]
                                            [--overwrite]

With no arguments it converts `berkeley-nest/Starling-RM-7B-alpha` from the Hub into
`runs/starling_rm_7b_alpha_hf` (offline: one `error:` line naming the id).

The published weights are a PyTorch pickle of the model card's `GPTRewardModel` state dict, which the card loads
with `strict=False`: the Llama-2-7B-chat trunk under `model.model.*` and/or `transformer.*` (the same module
registered twice, so both copies must be equal), possibly `model.lm_head.weight` (ignored: the reward model
has no LM head) and `v_head.weight` [1, hidden] (→ `score.weight`). The pickle is read with
`torch.load(weights_only=True)`, which refuses any code in it (torch: the `dev` extra).

`--base` (default `meta-llama/Llama-2-7b-chat-hf`, a folder or Hub id) gives `config.json` (unless `--input` is
a folder with one) and the tokenizer. The output folder: `config.json` (`LlamaForSequenceClassification`,
`num_labels` 1, `pad_token_id` 0 = `<unk>`, the Starling pad rule: the reward is read at the last token before
the padding, the final `</s>`), `model.safetensors` (or shards + index) in the stored dtype, and the tokenizer
with pad `<unk>` and the Starling (`llama2_chat`) format as its `chat_template`, so `apply_chat_template` gives
exactly the tokens Starling-RM scored. Written aside and renamed into place; an existing non-empty `--output`
is refused unless `--overwrite`. The last printed line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from starling_jax import cli
from starling_jax.errors import CheckpointError, ConfigError

DEFAULT_BASE = "meta-llama/Llama-2-7b-chat-hf"
DEFAULT_INPUT = "berkeley-nest/Starling-RM-7B-alpha"
DEFAULT_OUTPUT = "runs/starling_rm_7b_alpha_hf"
TEMPLATE = "llama2_chat"  # the Starling-RM-7B-alpha format
MAX_LENGTH = 2048
PICKLE_NAMES = ("*.bin", "*.pt", "*.pth")
IGNORED = ("model.lm_head.weight", "lm_head.weight")


def find_pickle(path: Path) -> Path:
    """The weights file: `path` itself, or the single `.bin`/`.pt`/`.pth` in a folder (a Hub id is downloaded)."""
    if path.is_file():
        return path
    if not path.exists():
        text = str(path)
        if text.count("/") != 1 or text.startswith((".", "/", "~")) or Path(text).suffix:
            raise CheckpointError(f"{path}: no such file or folder")
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(text, allow_patterns=["*.bin", "*.pt", "*.pth", "*.json"]))
        except Exception as e:  # noqa: BLE001 - offline, unknown or gated repo
            reason = cli.brief(str(e))  # its first line, never cut inside a word
            raise CheckpointError(
                f"{text}: not a local file or folder and not fetched from the HuggingFace Hub "
                f"({type(e).__name__}: {reason}); download it and pass the folder"
            ) from None
    files = sorted({p for pattern in PICKLE_NAMES for p in path.glob(pattern)} - {path / "training_args.bin"})
    if len(files) != 1:
        raise CheckpointError(f"{path}: expected one .bin/.pt weights file, found {[p.name for p in files]}")
    return files[0]


def load_state_dict(path: Path) -> dict:
    """`torch.load(weights_only=True)`: tensors and containers only, never code (CheckpointError otherwise)."""
    try:
        import torch
    except ImportError:
        raise ConfigError(
            "convert_starling needs PyTorch to read the pickle: pip install 'starling_jax[dev]'"
        ) from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - code in the pickle, not a zip/pickle file, truncated, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: cannot load with torch.load(weights_only=True) ({type(e).__name__}: {reason[:300]})"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise CheckpointError(f"{path}: not a state dict (a mapping of tensor names to tensors)")
    return sd


def starling_to_hf_keys(sd: dict, source: Path) -> dict:
    """GPTRewardModel names → `LlamaForSequenceClassification` names (`model.*`, `score.weight`)."""
    import torch

    from starling_jax.model import hf_io  # JAX: not at import (`--help` and flag errors stay instant)

    out: dict = {}
    origin: dict[str, str] = {}
    for key, value in sd.items():
        if key in IGNORED or key.endswith(hf_io.IGNORED_SUFFIXES):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is {type(value).__name__}, not a tensor")
        if key == "v_head.weight":
            name = "score.weight"
        elif key.startswith("model.model."):
            name = "model." + key.removeprefix("model.model.")
        elif key.startswith("transformer."):
            name = "model." + key.removeprefix("transformer.")
        else:
            raise CheckpointError(
                f"{source}: unexpected tensor {key!r} (a GPTRewardModel state dict holds "
                "model.model.*, transformer.*, model.lm_head.weight and v_head.weight)"
            )
        if name in out:
            if out[name].shape != value.shape or not torch.equal(out[name], value):
                raise CheckpointError(
                    f"{source}: {key!r} differs from {origin[name]!r}; both name the same trunk "
                    "module and must be equal"
                )
            continue
        out[name], origin[name] = value, key
    return out


def convert(input: str, base: str, output: str, overwrite: bool = False, max_shard_size: int | str = "5GB") -> dict:
    import torch
    from safetensors.torch import save_file

    # JAX, transformers and huggingface_hub load here, not at import: `--help` and flag errors stay instant
    from starling_jax import hub
    from starling_jax.data import tokenizer as tokenizer_lib
    from starling_jax.model import hf_io
    from starling_jax.model.config import ModelConfig
    from starling_jax.paths import atomic_folder, check_output_folder

    check_output_folder(output, overwrite)
    src = Path(input)
    pickle_path = find_pickle(src)
    base_dir = hub.resolve(base, key="--base", files="config")  # config.json and tokenizer, not the weights
    config_src = src / "config.json" if src.is_dir() and (src / "config.json").is_file() else base_dir / "config.json"
    hf_config = hf_io.read_hf_config(config_src.parent)
    if hf_config.get("model_type") != "llama":
        raise CheckpointError(
            f"{config_src}: model_type {hf_config.get('model_type')!r}; Starling-RM-7B-alpha is a "
            "Llama-2 model (give --base meta-llama/Llama-2-7b-chat-hf or its folder)"
        )
    tensors = starling_to_hf_keys(load_state_dict(pickle_path), pickle_path)
    if "score.weight" not in tensors:
        raise CheckpointError(f"{pickle_path}: no v_head.weight (the reward head)")
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"{pickle_path}: mixed dtypes {sorted(map(str, dtypes))}")
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtypes.pop())
    if dtype is None:
        raise CheckpointError(f"{pickle_path}: unsupported dtype {next(iter(tensors.values())).dtype}")
    cfg = ModelConfig.from_hf_dict(hf_config, source=str(config_src), param_dtype=dtype)
    expected = {s.hf_name: s.hf_shape for s in hf_io.key_table(cfg, "reward")}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{pickle_path}: does not match {config_src}: "
            + (f"missing {missing[:3]} " if missing else "")
            + (f"unexpected {extra[:3]}" if extra else "")
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(
                f"{pickle_path}: tensor {name} has shape {list(tensors[name].shape)}, "
                f"{config_src} implies {list(shape)}"
            )

    # tokenizer: pad <unk> (the Starling rule) and the Starling format as chat_template, checked to render the
    # training tokens exactly; the data record lets `score` check the tokenizer
    tok = tokenizer_lib.prepare_export_tokenizer(base_dir, TEMPLATE, output, pad_token="unk")
    pad = tok.pad_token_id
    provenance = tokenizer_lib.data_provenance(tok, base, TEMPLATE, MAX_LENGTH)
    config = hf_io.hf_config_dict(
        cfg, "reward", pad, {"starling_jax_data": provenance, "converted_from": str(pickle_path)}
    )
    tensors = {name: tensors[name] for name in expected}  # key-table order: the files `save_hf` would write
    split = hf_io.plan_shards({n: t.numel() * t.element_size() for n, t in tensors.items()}, max_shard_size)
    with atomic_folder(output) as out:  # written aside, renamed into place when complete
        hf_io.write_safetensors(out, split, lambda names: {n: tensors[n].contiguous() for n in names}, save_file)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        hf_io.write_tokenizer(out, base_dir, tok)
    return {
        "status": "completed",
        "input": str(pickle_path),
        "output_dir": str(output),
        "architecture": "LlamaForSequenceClassification",
        "dtype": dtype,
        "pad_token_id": pad,
        "template": TEMPLATE,
        "num_params": int(sum(t.numel() for t in tensors.values())),
    }


def shard_size(text: str) -> int | str:
    """`--max-shard-size`: bytes as digits, or a number with huggingface_hub's units ("5GB", "500MB")."""
    if not re.fullmatch(r"\d+(KB|MB|GB|TB)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: give bytes (1000000) or a size such as 5GB or 500MB")
    return int(text) if text.isdigit() else text


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m starling_jax.convert_starling", description=__doc__)
    parser.add_argument(
        "--input",
        default=DEFAULT_INPUT,
        help=f"the Starling-RM-7B-alpha .bin/.pt file, its folder, or a Hub id (default: {DEFAULT_INPUT})",
    )
    parser.add_argument(
        "--base",
        default=DEFAULT_BASE,
        help=f"folder or Hub id with the Llama-2-7B-chat config.json and tokenizer (default: {DEFAULT_BASE})",
    )
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"HF folder to write (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output folder")
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        type=shard_size,
        help="largest safetensors file, in bytes or as '5GB'/'500MB' (huggingface_hub's planner; default: 5GB)",
    )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    cli.setup_logging()

    def run():
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # usage errors: one line
        return convert(args.input, args.base, args.output, args.overwrite, args.max_shard_size)

    return cli.run_main(run)


if __name__ == "__main__":
    sys.exit(main())
