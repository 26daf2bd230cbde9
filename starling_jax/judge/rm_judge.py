"""`--judge rm:DIR`: a reward model ranks each row's answers by reward (higher = better), ties stay ties.

The rewards are `score`'s (`eval.scorer.RewardScorer`: the same rendering, tokenizer, template, truncation and bucketed
forward), so `label --judge rm:DIR` orders answers exactly as `python -m starling_jax.score --model DIR` scores
them. A row that does not fit the model's max_length is rejected with the reason."""

from __future__ import annotations

from starling_jax.data.chat import parse_hh
from starling_jax.data.nectar import Ranking
from starling_jax.data.tokenize import RowDoesNotFit
from starling_jax.judge.aggregate import ranks_from_scores
from starling_jax.judge.rows import Row


def label_rows_rm(
    rows: list[Row],
    model: str,
    judge_spec: str,
    *,
    template: str | None = None,
    max_length: int | None = None,
    batch_size: int = 32,
):
    """→ (labelled: [(row, ranks, record)], rejected: [{row, reason}], template used)."""
    from starling_jax.eval.scorer import RewardScorer  # loads JAX: only this judge needs it

    scorer = RewardScorer(model, template, max_length, batch_size)
    tokenized, kept, rejected = [], [], []
    for row in rows:
        ranking = Ranking(
            row=row.row,
            prompt=row.prompt,
            messages=tuple(parse_hh(row.prompt)),
            answers=row.answers,
            ranks=tuple(1.0 for _ in row.answers),
            models=row.models,
        )
        try:
            tokenized.append(scorer.tokenize(ranking))
            kept.append(row)
        except RowDoesNotFit as e:
            rejected.append({"row": row.row, "reason": f"does not fit the reward model: {e}"})
    labelled = []
    for row, rewards, tr in zip(kept, scorer.rewards(tokenized), tokenized):
        record = {
            "judge": judge_spec,
            "rewards": [float(r) for r in rewards],
            "orders": None,
            "agreement": None,
            "truncated": bool(tr.truncated),
        }
        labelled.append((row, ranks_from_scores(rewards), record))
    return labelled, rejected, scorer.template
