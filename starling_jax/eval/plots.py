"""The PNGs of `evaluate` (matplotlib with the Agg backend, imported when a plot is written: `--no-plot` runs and
the library functions do not pay its start-up)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rewardbench_png(results: dict, path: Path, title: str) -> Path:
    """Section scores and overall as bars, and per-subset accuracy when the chosen answer is longer vs shorter."""
    from starling_jax.eval.rewardbench import SECTIONS, SUBSETS

    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 3]})
    names = [*SECTIONS, "Overall"]
    values = [100 * results["sections"][s] for s in SECTIONS] + [100 * results["overall"]]
    ax1.bar(names, values, color=["C0"] * len(SECTIONS) + ["C3"])
    ax1.set_ylim(0, 100)
    ax1.set_ylabel("score (%)")
    ax1.tick_params(axis="x", rotation=30)
    present = [s for s in SUBSETS if s in results["length"]]
    longer = [100 * (results["length"][s]["chosen_longer_accuracy"] or 0) for s in present]
    shorter = [100 * (results["length"][s]["chosen_shorter_accuracy"] or 0) for s in present]
    x = range(len(present))
    ax2.bar([i - 0.2 for i in x], longer, width=0.4, label="chosen longer")
    ax2.bar([i + 0.2 for i in x], shorter, width=0.4, label="chosen shorter")
    ax2.set_xticks(list(x), present, rotation=60, ha="right", fontsize=7)
    ax2.set_ylim(0, 100)
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bon_png(rows: list[dict], path: Path, title: str) -> Path:
    """Mean best-of-n reward against the analytic KL (n marked on the points)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    kl = [r["kl_analytic"] for r in rows]
    mean = [r["mean_reward"] for r in rows]
    ax.errorbar(kl, mean, yerr=[r["sem"] for r in rows], marker="o")
    for r in rows:
        ax.annotate(f"n={r['n']}", (r["kl_analytic"], r["mean_reward"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("KL(best-of-n ‖ policy) = log n − (n−1)/n  (nats)")
    ax.set_ylabel("mean reward of the best of n")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def policy_png(rows: list[dict], path: Path, title: str) -> Path:
    """Per model: win rate and length-controlled win rate (or mean reward / MT-Bench score) beside mean length."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["model_name"] for r in rows]
    x = range(len(rows))
    if any(r.get("win_rate") is not None for r in rows):
        ax1.bar([i - 0.2 for i in x], [r.get("win_rate") or 0 for r in rows], width=0.4, label="win rate")
        ax1.bar(
            [i + 0.2 for i in x],
            [r.get("length_controlled_win_rate") or 0 for r in rows],
            width=0.4,
            label="length-controlled",
        )
        ax1.set_ylabel("% vs reference answers")
        ax1.legend()
    elif any(r.get("mtbench_score") is not None for r in rows):
        ax1.bar(list(x), [r.get("mtbench_score") or 0 for r in rows])
        ax1.set_ylabel("MT-Bench score (1-10)")
    else:
        ax1.bar(list(x), [r.get("mean_reward") or 0 for r in rows])
        ax1.set_ylabel("mean reward")
    ax1.set_xticks(list(x), names, rotation=20)
    ax2.bar(list(x), [r.get("mean_length") or 0 for r in rows], color="C2")
    ax2.set_xticks(list(x), names, rotation=20)
    ax2.set_ylabel("mean answer length (characters)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
