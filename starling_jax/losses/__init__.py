"""Reward-model losses (pure functions of arrays)."""

from starling_jax.losses.ranking import (
    RANKING_LOSSES,
    get_ranking_loss,
    pairwise_loss,
    plackett_luce_loss,
    ranking_loss,
    reward_centering_loss,
)

__all__ = [
    "RANKING_LOSSES",
    "get_ranking_loss",
    "pairwise_loss",
    "plackett_luce_loss",
    "ranking_loss",
    "reward_centering_loss",
]
