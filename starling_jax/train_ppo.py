"""Policy tuning with PPO, APA, GRPO or RLOO against a trained reward model (Starling's second half).

    python -m starling_jax.train_ppo [CONFIG.yaml] [key=value ...]

With no arguments: the embedded CPU demo. It tunes the policy of the default `train_sft` run (runs/sft_default/hf)
against the reward model of the default `train_rm` run (runs/rm_default/hf), training either first when missing,
and writes runs/ppo_default (checkpoints, TensorBoard, metrics.jsonl, summary.png of reward and KL, the tuned
policy as an HF `*ForCausalLM` folder in hf/). `algorithm=apa` runs APA instead of PPO; `algorithm=grpo` or
`algorithm=rloo` runs without a critic on groups of `rollout.group_size` answers per prompt (runs/grpo_default,
runs/rloo_default). A run resumes from the
latest complete checkpoint in `output_dir`; SIGTERM saves and exits. The last printed line is a JSON summary
(output_dir, steps, reward_start, reward_end, kl_end, algorithm, hf_export_dir, status, ...).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from starling_jax import cli

log = logging.getLogger("starling_jax")


def ensure_default_runs(cfg) -> None:
    """Trains the default reward model / SFT policy when the run uses them and they are missing; a failed child run
    is one line naming its command and its log (`<default run folder>.log`, e.g. runs/rm_default.log)."""
    from starling_jax.rl.config import DEFAULT_POLICY, DEFAULT_REWARD_MODEL

    for path, module, key in (
        (cfg.reward_model, "starling_jax.train_rm", "reward_model"),
        (cfg.policy, "starling_jax.train_sft", "policy"),
    ):
        default = DEFAULT_REWARD_MODEL if key == "reward_model" else DEFAULT_POLICY
        if path == default and not (Path(path) / "config.json").is_file():
            run_dir = Path(path).parent  # runs/rm_default for runs/rm_default/hf
            cli.run_default_run(
                module,
                run_dir.with_name(run_dir.name + ".log"),
                f"to train the missing {key}={path} (the default {module.rsplit('.', 1)[1]} run)",
                f"set {key}=FOLDER_OR_HUB_ID",
            )


def train(config_file: str | None, overrides: list[str]) -> dict:
    # imported here so that --help and config errors need no JAX start-up
    from starling_jax.config import load_config
    from starling_jax.rl.config import PPORunConfig
    from starling_jax.rl.job import train_ppo

    cfg = load_config(PPORunConfig, config_file, overrides)
    ensure_default_runs(cfg)
    cli.initialize_distributed()
    return train_ppo(cfg)


def build_parser():
    return cli.config_parser("python -m starling_jax.train_ppo", __doc__, "algorithm=apa train.steps=20")


def main(argv=None) -> int:
    return cli.config_main(argv, build_parser(), train)


if __name__ == "__main__":
    cli.without_torch()
    sys.exit(main())
