"""Best-of-n with a reward model: the mean reward of the best of n samples vs n, with the analytic KL.

For each prompt the policy draws N = max(n) independent samples (`generate --num-samples N`); the reward model
scores each (`eval.scorer.RewardScorer`); best-of-n takes the highest-reward sample among the FIRST n (so the n's share
their samples and the curve is the max over nested sets, as in Stiennon et al. / Gao et al. 2022). The analytic KL
between the best-of-n policy and the policy is log n − (n − 1)/n (Stiennon et al. 2020, appendix; an upper bound
for continuous reward distributions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from starling_jax.errors import ConfigError


def analytic_kl(n: int) -> float:
    """KL(best-of-n ‖ policy) = log n − (n − 1)/n (nats)."""
    return math.log(n) - (n - 1) / n


def parse_ns(text: str) -> list[int]:
    """'1,2,4' → [1, 2, 4] (sorted, distinct, each ≥ 1) or a one-line error naming --n."""
    try:
        ns = sorted({int(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--n {text!r}: expected comma-separated integers like 1,2,4,8") from None
    if not ns or ns[0] < 1:
        raise ConfigError(f"--n {text!r}: every n must be ≥ 1")
    return ns


def best_of_n_table(rewards: Sequence[Sequence[float]], ns: Sequence[int]) -> list[dict]:
    """rewards[prompt][sample] (≥ max(ns) samples each) → one row per n: mean (over prompts) of the best reward among
    the first n samples, its standard error, and the analytic KL."""
    r = np.asarray(rewards, np.float64)
    out = []
    for n in ns:
        best = r[:, :n].max(axis=1)
        sem = float(best.std(ddof=1) / math.sqrt(len(best))) if len(best) > 1 else 0.0
        out.append(
            {
                "n": int(n),
                "mean_reward": float(best.mean()),
                "sem": sem,
                "kl_analytic": analytic_kl(n),
                "prompts": len(best),
            }
        )
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'n':>5} {'mean reward':>12} {'± sem':>8} {'KL (nats)':>10}"]
    for row in rows:
        lines.append(f"{row['n']:>5} {row['mean_reward']:>12.4f} {row['sem']:>8.4f} {row['kl_analytic']:>10.4f}")
    return "\n".join(lines)
