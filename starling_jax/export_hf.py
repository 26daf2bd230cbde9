"""Export a starling_jax checkpoint as a HuggingFace folder.

    python -m starling_jax.export_hf --checkpoint CKPT_DIR --output HF_DIR [--step N] [--tokenizer DIR]

A reward-model checkpoint becomes `MistralForSequenceClassification` / `LlamaForSequenceClassification`
(`num_labels: 1`, `pad_token_id` set, tokenizer with its chat template, the eval split's reward mean/std in
`config.json`); a policy checkpoint becomes `*ForCausalLM`. CKPT_DIR may be a run's output folder, its
`checkpoints/` folder or one step folder; the latest complete step is used unless --step is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from starling_jax import cli


def export(checkpoint: str, output: str, step: int | None = None, tokenizer: str | None = None) -> dict:
    from pathlib import Path

    from starling_jax.ckpt.manager import load_model
    from starling_jax.errors import CheckpointError
    from starling_jax.model import hf_io
    from starling_jax.model.create import num_params
    from starling_jax.parallel import sharding

    mesh = sharding.make_mesh(sharding.MeshConfig())
    meta, model_cfg, _, params = load_model(checkpoint, mesh, step)
    tokenizer_dir = tokenizer or meta.get("tokenizer_dir")
    if not tokenizer_dir or not Path(tokenizer_dir).is_dir():
        raise CheckpointError(f"{checkpoint}: its tokenizer folder {tokenizer_dir!r} is gone; pass --tokenizer DIR")
    extra = {}
    if meta["role"] == "reward":
        evals = meta.get("eval", {})
        extra = {"reward_mean": evals.get("reward_mean"), "reward_std": evals.get("reward_std")}
    folder = hf_io.save_hf(output, model_cfg, params, meta["role"], tokenizer_dir=tokenizer_dir, extra_config=extra)
    return {"status": "completed", "checkpoint": str(checkpoint), "output": str(folder), "role": meta["role"],
            "architecture": hf_io.hf_config_dict(model_cfg, meta["role"])["architectures"][0],
            "num_params": num_params(params), **extra}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m starling_jax.export_hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (run output, checkpoints/, or a step; "
                        f"default: {cli.DEFAULT_RUN_DIR}, the embedded train_rm run)")
    parser.add_argument("--output", default=None, help="HF folder to write (default: CHECKPOINT/hf_export)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest complete)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one the run used)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cli.setup_logging()

    def run():
        checkpoint = cli.embedded_default(args.checkpoint, cli.DEFAULT_RUN_DIR, "--checkpoint")
        return export(checkpoint, args.output or str(Path(checkpoint) / "hf_export"), args.step, args.tokenizer)

    return cli.run_main(run)


if __name__ == "__main__":
    sys.exit(main())
