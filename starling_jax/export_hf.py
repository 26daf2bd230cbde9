"""Export a starling_jax checkpoint as a HuggingFace folder.

    python -m starling_jax.export_hf --checkpoint CKPT_DIR --output HF_DIR [--step N] [--tokenizer DIR] [--overwrite]

A reward-model checkpoint becomes `MistralForSequenceClassification` / `LlamaForSequenceClassification`
(`num_labels: 1`, `pad_token_id` set, tokenizer with its chat template, the eval split's reward mean/std in
`config.json`); a policy checkpoint becomes `*ForCausalLM`. CKPT_DIR may be a run's output folder, its
`checkpoints/` folder or one step folder; the latest complete step is used unless --step is given. CKPT_DIR and
HF_DIR may be local paths or URLs (`gs://bucket/run`).

The exported tokenizer's `chat_template` is the format the run trained with (recorded in the checkpoint), so
`apply_chat_template` gives exactly the training tokens, reward token included, whatever template `init_from`'s
tokenizer carried; a reward model's `pad_token_id` never equals the token the reward is read at (HF pools at the
last non-pad token). The folder is written aside and renamed into place; an existing non-empty `--output` is
refused unless `--overwrite`.
"""

from __future__ import annotations

import sys

from starling_jax import cli
from starling_jax.paths import as_path, check_output_folder, is_url


def export(
    checkpoint: str, output: str, step: int | None = None, tokenizer: str | None = None, overwrite: bool = False
) -> dict:
    from starling_jax.ckpt.manager import load_model
    from starling_jax.data.tokenizer import resolve_tokenizer_dir
    from starling_jax.errors import CheckpointError
    from starling_jax.model import hf_io
    from starling_jax.model.create import num_params
    from starling_jax.parallel import sharding

    mesh = sharding.make_mesh(sharding.MeshConfig())
    meta, model_cfg, _, params = load_model(checkpoint, mesh, step)
    tokenizer_dir = tokenizer or meta.get("tokenizer_dir")
    if is_url(tokenizer_dir):
        tokenizer_dir = resolve_tokenizer_dir(tokenizer_dir)  # copied into the local cache
    if not tokenizer_dir or not as_path(tokenizer_dir).is_dir():
        raise CheckpointError(f"{checkpoint}: its tokenizer folder {tokenizer_dir!r} is gone; pass --tokenizer DIR")
    extra = {}
    if meta["role"] == "reward":
        evals = meta.get("eval", {})
        extra = {"reward_mean": evals.get("reward_mean"), "reward_std": evals.get("reward_std")}
    if meta.get("data"):
        extra["starling_jax_data"] = meta["data"]
    check_output_folder(output, overwrite)
    folder = hf_io.save_hf(
        output,
        model_cfg,
        params,
        meta["role"],
        tokenizer_dir=tokenizer_dir,
        template=meta.get("template"),
        extra_config=extra,
        overwrite=overwrite,
    )
    return {
        "status": "completed",
        "checkpoint": str(checkpoint),
        "output_dir": str(folder),
        "role": meta["role"],
        "architecture": hf_io.hf_config_dict(model_cfg, meta["role"])["architectures"][0],
        "num_params": num_params(params),
        **extra,
    }


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m starling_jax.export_hf", description=__doc__)
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint folder (run output, checkpoints/, or a step; "
        f"default: {cli.DEFAULT_RUN_DIR}, the embedded train_rm run)",
    )
    parser.add_argument("--output", default=None, help="HF folder to write (default: CHECKPOINT/hf_export)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest complete)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one the run used)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output folder")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    cli.setup_logging()

    def run():
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # usage errors: one line
        checkpoint = cli.embedded_default(args.checkpoint, cli.DEFAULT_RUN_DIR, "--checkpoint")
        return export(
            checkpoint, args.output or str(as_path(checkpoint) / "hf_export"), args.step, args.tokenizer, args.overwrite
        )

    return cli.run_main(run)


if __name__ == "__main__":
    cli.without_torch()
    sys.exit(main())
