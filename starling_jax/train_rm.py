"""Train a reward model on Nectar-format K-wise rankings.

    python -m starling_jax.train_rm [CONFIG.yaml] [key=value ...]

With no arguments: the embedded CPU demo (tiny Mistral-shaped model, real Mistral tokenizer, bundled synthetic
Nectar-format data), a few minutes on a laptop. `configs/rm_*.yaml` are the 7B TPU recipes. A run resumes from
the latest complete checkpoint in `output_dir`; SIGTERM saves and exits. The last printed line is a JSON summary.
"""

from __future__ import annotations

import sys

from starling_jax import cli


def train(config_file: str | None, overrides: list[str]) -> dict:
    # imported here so that --help and config errors need no JAX start-up
    from starling_jax.config import load_config
    from starling_jax.train.rm_config import RMRunConfig
    from starling_jax.train.rm_job import train_reward_model

    cfg = load_config(RMRunConfig, config_file, overrides)
    cli.initialize_distributed()
    return train_reward_model(cfg)


def build_parser():
    return cli.config_parser("python -m starling_jax.train_rm", __doc__, "train.steps=100 data.batch_size=4")


def main(argv=None) -> int:
    return cli.config_main(argv, build_parser(), train)


if __name__ == "__main__":
    cli.without_torch()
    sys.exit(main())
