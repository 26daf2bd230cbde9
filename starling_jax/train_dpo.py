"""Direct preference optimization (DPO) of a policy on Nectar-format K-wise rankings.

    python -m starling_jax.train_dpo [CONFIG.yaml] [key=value ...]

With no arguments: the embedded CPU demo. It tunes the policy of the default `train_sft` run (runs/sft_default/hf,
trained first when missing) on the bundled synthetic rankings with the K-wise (Plackett-Luce) DPO loss against a
frozen copy of itself, and writes runs/dpo_default (checkpoints, TensorBoard, metrics.jsonl, summary.png, the tuned
policy as an HF `*ForCausalLM` folder with the trained chat format in hf/). `loss.name=pairwise | ipo` picks the
pairwise sigmoid DPO or IPO losses; `reference_logps=precompute` computes the reference once before training;
`num_layers_unfrozen=N` trains the top N layers against a hydra reference. A run resumes from the latest complete
checkpoint in `output_dir`; SIGTERM saves and exits. The last printed line is a JSON summary (output_dir, steps,
eval_pairwise_accuracy_start, eval_pairwise_accuracy_end, eval_kendall_tau_end, eval_logratio_end, hf_export_dir,
status, ...). `configs/dpo_base.yaml` lists every key.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from starling_jax import cli

log = logging.getLogger("starling_jax")


def ensure_default_policy(cfg) -> None:
    """Trains the default SFT policy when the run uses it and it is missing (as train_ppo's default chain)."""
    from starling_jax.train.dpo_config import DEFAULT_POLICY

    if cfg.policy == DEFAULT_POLICY and not (Path(cfg.policy) / "config.json").is_file():
        log.info("%s is missing: running python -m starling_jax.train_sft first", cfg.policy)
        subprocess.run([sys.executable, "-m", "starling_jax.train_sft"], check=True)


def train(config_file: str | None, overrides: list[str]) -> dict:
    # imported here so that --help and config errors need no JAX start-up
    from starling_jax.config import load_config
    from starling_jax.train.dpo_config import DPORunConfig
    from starling_jax.train.dpo_job import train_dpo

    cfg = load_config(DPORunConfig, config_file, overrides)
    ensure_default_policy(cfg)
    cli.initialize_distributed()
    return train_dpo(cfg)


def build_parser():
    return cli.config_parser("python -m starling_jax.train_dpo", __doc__, "loss.name=pairwise train.steps=50")


def main(argv=None) -> int:
    return cli.config_main(argv, build_parser(), train)


if __name__ == "__main__":
    cli.without_torch()
    sys.exit(main())
