"""Policy tuning with PPO or APA against a trained reward model (Starling's second half).

    python -m starling_jax.train_ppo [CONFIG.yaml] [key=value ...]

With no arguments: the embedded CPU demo. It tunes the policy of the default `train_sft` run (runs/sft_default/hf)
against the reward model of the default `train_rm` run (runs/rm_default/hf), training either first when missing,
and writes runs/ppo_default (checkpoints, TensorBoard, metrics.jsonl, summary.png of reward and KL, the tuned
policy as an HF `*ForCausalLM` folder in hf/). `algorithm=apa` runs APA instead of PPO. A run resumes from the
latest complete checkpoint in `output_dir`; SIGTERM saves and exits. The last printed line is a JSON summary
(output_dir, steps, reward_start, reward_end, kl_end, algorithm, hf_export_dir, status, ...).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from starling_jax import cli

log = logging.getLogger("starling_jax")


def ensure_default_runs(cfg) -> None:
    """Trains the default reward model / SFT policy when the run uses them and they are missing."""
    from starling_jax.rl.config import DEFAULT_POLICY, DEFAULT_REWARD_MODEL

    for path, module in ((cfg.reward_model, "starling_jax.train_rm"), (cfg.policy, "starling_jax.train_sft")):
        default = DEFAULT_REWARD_MODEL if module.endswith("rm") else DEFAULT_POLICY
        if path == default and not (Path(path) / "config.json").is_file():
            log.info("%s is missing: running python -m %s first", path, module)
            subprocess.run([sys.executable, "-m", module], check=True)


def train(config_file: str | None, overrides: list[str]) -> dict:
    # imported here so that --help and config errors need no JAX start-up
    from starling_jax.config import load_config
    from starling_jax.rl.config import PPORunConfig
    from starling_jax.rl.job import train_ppo

    cfg = load_config(PPORunConfig, config_file, overrides)
    ensure_default_runs(cfg)
    cli.initialize_distributed()
    return train_ppo(cfg)


def main(argv=None) -> int:
    return cli.config_main(argv, "python -m starling_jax.train_ppo", __doc__, "algorithm=apa train.steps=20",
                           train)


if __name__ == "__main__":
    cli.without_torch()
    sys.exit(main())
