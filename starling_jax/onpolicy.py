"""On-policy preference data in rounds: the policy's K samples on the RL prompts → `label` (a reward model or an LLM
judge) → `train_dpo` (and/or a continued `train_rm`) → the next round, from the policy the round trained.

    python -m starling_jax.onpolicy [CONFIG.yaml] [key=value ...]

With no arguments: two quick rounds on the embedded defaults (the default `train_sft` policy runs/sft_default/hf and
`train_rm` reward model runs/rm_default/hf, each trained first when missing; the bundled prompts; the reward model
as the judge), written to runs/onpolicy_default; `configs/onpolicy_example.yaml` is the same example, spelled out.
Each round N writes output_dir/round_N/: prompts.jsonl, samples.jsonl (K samples per prompt), unranked.jsonl,
labelled.jsonl (Nectar rows ranked by the judge), dpo/ and/or rm/ (the training runs, with hf/ exports), eval.jsonl
(the held-out reward of the round's policy by `reward_model`) and each stage's <stage>.summary.json; round_0/ holds
the starting policy's held-out reward. A restarted chain reuses every finished stage and runs from the first
unfinished one. The last printed line is a JSON summary with per-round results (rows labelled, DPO pairwise
accuracy, held-out reward, output folders). `configs/onpolicy_base.yaml` lists every key.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from starling_jax import cli

log = logging.getLogger("starling_jax")


def ensure_defaults(cfg) -> None:
    """Trains the embedded default policy and reward model first when the chain uses them and they are missing."""
    from starling_jax.train.dpo_config import DEFAULT_POLICY

    needed = [
        (cfg.policy == DEFAULT_POLICY, DEFAULT_POLICY, "starling_jax.train_sft", "policy"),
        (cfg.reward_model == cli.DEFAULT_HF_DIR, cli.DEFAULT_HF_DIR, "starling_jax.train_rm", "reward_model"),
    ]
    for used, folder, module, key in needed:
        if used and not (Path(folder) / "config.json").is_file():
            run_dir = str(Path(folder).parent)
            cli.run_default_run(module, f"{run_dir}.log", f"to train the default {key} {folder}", f"pass {key}=DIR")


def run(config_file: str | None, overrides: list[str]) -> dict:
    # imported here so that --help and config errors need no JAX start-up
    from starling_jax.config import load_config
    from starling_jax.rounds.chain import run_rounds
    from starling_jax.rounds.config import OnPolicyConfig

    cfg = load_config(OnPolicyConfig, config_file, overrides)
    ensure_defaults(cfg)
    return run_rounds(cfg)


def build_parser():
    return cli.config_parser("python -m starling_jax.onpolicy", __doc__, "rounds=3 prompts.per_round=128")


def main(argv=None) -> int:
    return cli.config_main(argv, build_parser(), run)


if __name__ == "__main__":
    cli.without_torch()
    sys.exit(main())
