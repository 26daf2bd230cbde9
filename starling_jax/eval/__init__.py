"""Evaluation library behind `python -m starling_jax.evaluate` (the entry point is `starling_jax/evaluate.py`).

- `rewardbench`: RewardBench v1 (filtered) per-subset accuracy, section and overall scores exactly as the
  `rewardbench` package computes them, length statistics; pair scorers (reward model; DPO implied rewards).
- `winrate`: win rate against reference answers and AlpacaEval 2's length-controlled win rate.
- `bon`: best-of-n with a reward model; the analytic KL of best-of-n.
- `mtbench`: MT-Bench question files, the single-answer grading prompts, rating parsing, per-category scores.
- `policy`: `evaluate policy` (generate with the sampler, judge with the `label` judges, one comparison table).
- `plots`: the PNGs (matplotlib, imported only when a plot is written).
"""
