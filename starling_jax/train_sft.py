"""Supervised fine-tuning of a chat policy (causal LM) on the best-ranked answers, with the chat template.

    python -m starling_jax.train_sft [CONFIG.yaml] [key=value ...]

With no arguments: the embedded CPU demo (tiny Mistral-shaped policy, real Mistral tokenizer, the rank-1 answers
of the bundled synthetic Nectar-format data), a few minutes on a laptop; it writes runs/sft_default with the HF
`MistralForCausalLM` export in runs/sft_default/hf. Data: a Nectar-schema file (rank-1 answers; ties: every
tied-best answer) or JSON lines of {"messages": [...]}; the loss is on the assistant's final answer only. A run
resumes from the latest complete checkpoint in `output_dir`; SIGTERM saves and exits. The last printed line is a
JSON summary (output_dir, steps, eval_loss_start, eval_loss_end, hf_export_dir, status, ...).
"""

from __future__ import annotations

import sys

from starling_jax import cli


def train(config_file: str | None, overrides: list[str]) -> dict:
    # imported here so that --help and config errors need no JAX start-up
    from starling_jax.config import load_config
    from starling_jax.train.sft_config import SFTRunConfig
    from starling_jax.train.sft_job import train_sft

    cfg = load_config(SFTRunConfig, config_file, overrides)
    cli.initialize_distributed()
    return train_sft(cfg)


def build_parser():
    return cli.config_parser("python -m starling_jax.train_sft", __doc__, "train.steps=100 data.batch_size=8")


def main(argv=None) -> int:
    return cli.config_main(argv, build_parser(), train)


if __name__ == "__main__":
    cli.without_torch()
    sys.exit(main())
