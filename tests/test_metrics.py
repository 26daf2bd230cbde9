"""Tests of starling_jax.eval.metrics against hand-computed examples and brute-force references."""

import itertools
import json
import math

import numpy as np
import pytest

from starling_jax.eval.metrics import RankingMetrics, ranking_metrics


def tau_b_reference(x, y):
    """Kendall τ-b by the textbook formula: (n_c − n_d) / sqrt((n0 − n1)(n0 − n2)), ties by group sizes."""
    n = len(x)
    nc = nd = 0
    for i, j in itertools.combinations(range(n), 2):
        s = (x[i] - x[j]) * (y[i] - y[j])
        nc += s > 0
        nd += s < 0
    n0 = n * (n - 1) / 2
    n1 = sum(t * (t - 1) / 2 for t in _group_sizes(x))
    n2 = sum(t * (t - 1) / 2 for t in _group_sizes(y))
    if n0 == n2:  # all of y tied (or < 2 items): nothing to order
        return None
    if n0 == n1:  # all of x tied: a collapsed model scores 0
        return 0.0
    return (nc - nd) / math.sqrt((n0 - n1) * (n0 - n2))


def _group_sizes(v):
    counts = {}
    for a in v:
        counts[a] = counts.get(a, 0) + 1
    return counts.values()


def test_hand_computed_single_prompt():
    m = ranking_metrics(
        rewards=np.array([[3.0, 1.0, 2.0]]),
        ranks=np.array([[1.0, 2.0, 3.0]]),
        answer_mask=np.ones((1, 3), bool),
        answer_lengths=np.array([[10, 20, 30]]),
    )
    # Pairs (1 vs 2): 3 > 1 ok; (1 vs 3): 3 > 2 ok; (2 vs 3): 1 < 2 wrong.
    assert m["pairwise_accuracy"] == pytest.approx(2 / 3)
    assert m["num_pairs"] == 3
    assert m["top1_accuracy"] == 1.0
    # Concordant 2, discordant 1, no ties → τ = 1/3.
    assert m["kendall_tau"] == pytest.approx(1 / 3)
    assert m["mean_reward_by_rank"] == {"1": 3.0, "2": 1.0, "3": 2.0}
    assert m["reward_mean"] == pytest.approx(2.0)
    assert m["reward_std"] == pytest.approx(math.sqrt(2 / 3))
    # Pearson of (3, 1, 2) with (10, 20, 30) = −0.5.
    assert m["reward_length_correlation"] == pytest.approx(-0.5)
    assert m["num_prompts"] == 1 and m["num_answers"] == 3


def test_ties_masks_and_padding_rows():
    nan = float("nan")
    rewards = np.array(
        [
            [2.0, 2.0, 0.0, nan],  # reward tie between rank 1 and rank 2; last answer masked (garbage)
            [1.0, 5.0, 0.0, 9.0],  # rank tie for best (ranks 1, 1, 2); highest reward 5 has rank 1 → correct
            [4.0, 4.0, 1.0, 0.0],  # highest reward tied between rank 2 and rank 1 answers → 0.5
            [7.0, 7.0, 7.0, 7.0],  # padding row: all masked
        ]
    )
    ranks = np.array(
        [
            [1.0, 2.0, 3.0, 0.0],
            [1.0, 1.0, 2.0, 0.0],
            [2.0, 1.0, 3.0, 4.0],
            [1.0, 2.0, 3.0, 4.0],
        ]
    )
    mask = np.array(
        [
            [True, True, True, False],
            [True, True, True, False],
            [True, True, True, True],
            [False, False, False, False],
        ]
    )
    lengths = np.ones((4, 4), int)
    m = ranking_metrics(rewards, ranks, mask, lengths)
    # Row 0 pairs: (r1,r2) tie 0.5, (r1,r3) 1, (r2,r3) 1 → 2.5 / 3.
    # Row 1 pairs (rank tie between answers 0 and 1 dropped): (a0 vs a2) 1>0 ok, (a1 vs a2) 5>0 ok → 2 / 2.
    # Row 2 pairs: better-first (a1 vs a0) 4=4 → 0.5; (a1 vs a2) 1; (a1 vs a3) 1; (a0 vs a2) 1; (a0 vs a3) 1;
    #   (a2 vs a3) 1 → 5.5 / 6.
    assert m["num_pairs"] == 3 + 2 + 6
    assert m["pairwise_accuracy"] == pytest.approx((2.5 + 2 + 5.5) / 11)
    # Top-1: row 0 argmax tied (rank 1 and rank 2) → 0.5; row 1 → 1; row 2 → 0.5.
    assert m["num_top1_prompts"] == 3
    assert m["top1_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["num_prompts"] == 3 and m["num_answers"] == 10
    assert m["mean_reward_by_rank"] == {
        "1": pytest.approx((2.0 + 1.0 + 5.0 + 4.0) / 4),
        "2": pytest.approx((2.0 + 0.0 + 4.0) / 3),
        "3": pytest.approx((0.0 + 1.0) / 2),
        "4": pytest.approx(0.0),
    }
    assert list(m["mean_reward_by_rank"]) == ["1", "2", "3", "4"]
    taus = [tau_b_reference(list(rewards[b][mask[b]]), list(-ranks[b][mask[b]])) for b in range(3)]
    assert None not in taus
    for b in range(3):  # row by row against the reference, then their mean
        one = ranking_metrics(rewards[b : b + 1], ranks[b : b + 1], mask[b : b + 1], lengths[b : b + 1])
        assert one["kendall_tau"] == pytest.approx(taus[b]) and one["num_kendall_prompts"] == 1
    assert m["kendall_tau"] == pytest.approx(np.mean(taus)) and m["num_kendall_prompts"] == 3
    # Zero length variance → correlation undefined → None; everything strict-JSON serializable.
    assert m["reward_length_correlation"] is None
    json.dumps(m, allow_nan=False)


def test_collapsed_model_scores_zero_kendall_tau():
    """All rewards of a prompt tied: τ is 0 for it, it is counted, and it pulls a good prompt's 1.0 down."""
    ranks = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    mask = np.ones((2, 3), bool)
    lengths = np.ones((2, 3), int)
    m = ranking_metrics(np.full((2, 3), 0.7), ranks, mask, lengths)
    assert m["kendall_tau"] == 0.0 and m["num_kendall_prompts"] == 2
    m = ranking_metrics(np.array([[3.0, 2.0, 1.0], [0.5, 0.5, 0.5]]), ranks, mask, lengths)
    assert m["kendall_tau"] == pytest.approx(0.5) and m["num_kendall_prompts"] == 2


def test_undefined_metrics_are_none():
    m = ranking_metrics(np.array([[1.0, 2.0]]), np.array([[1.0, 1.0]]), np.array([[True, True]]), np.array([[3, 4]]))
    assert m["pairwise_accuracy"] is None and m["num_pairs"] == 0
    assert m["top1_accuracy"] is None  # all ranks tied: nothing to get right
    assert m["kendall_tau"] is None and m["num_kendall_prompts"] == 0
    assert m["reward_length_correlation"] == pytest.approx(1.0)
    empty = RankingMetrics().compute()
    assert empty["num_prompts"] == 0 and empty["reward_mean"] is None and empty["mean_reward_by_rank"] == {}
    json.dumps(empty, allow_nan=False)


def test_random_against_brute_force_references():
    rng = np.random.default_rng(0)
    B, K = 40, 7
    rewards = np.round(rng.normal(size=(B, K)), 1)  # rounding creates some reward ties
    ranks = rng.integers(1, 6, size=(B, K)).astype(np.float32)  # and rank ties
    mask = rng.random((B, K)) > 0.25
    mask[:5, :] = True
    mask[5, :] = False
    lengths = rng.integers(5, 500, size=(B, K))
    garbage = np.where(mask, rewards, np.nan)  # masked rewards must not matter

    acc = RankingMetrics()
    for start in range(0, B, 16):  # uneven batches
        sl = slice(start, start + 16)
        acc.update(garbage[sl], ranks[sl], mask[sl], lengths[sl])
    m = acc.compute()
    json.dumps(m, allow_nan=False)

    # Brute-force references, prompt by prompt.
    correct, pairs, top1, n_top1, taus = 0.0, 0, 0.0, 0, []
    by_rank = {}
    pooled_r, pooled_l = [], []
    for b in range(B):
        idx = [k for k in range(K) if mask[b, k]]
        r = [float(rewards[b, k]) for k in idx]
        rk = [float(ranks[b, k]) for k in idx]
        pooled_r += r
        pooled_l += [float(lengths[b, k]) for k in idx]
        for k, rr in zip(rk, r):
            by_rank.setdefault(k, []).append(rr)
        for i, j in itertools.permutations(range(len(idx)), 2):
            if rk[i] < rk[j]:
                pairs += 1
                correct += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
        if len(idx) >= 2 and min(rk) < max(rk):
            n_top1 += 1
            winners = [i for i in range(len(idx)) if r[i] == max(r)]
            top1 += sum(rk[i] == min(rk) for i in winners) / len(winners)
        tau = tau_b_reference(r, [-x for x in rk]) if len(idx) >= 2 else None
        if tau is not None:
            taus.append(tau)
            try:  # an extra, independent check where scipy is installed (the brute force is the core check)
                from scipy.stats import kendalltau
            except ImportError:
                pass
            else:
                assert tau == pytest.approx(kendalltau(r, [-x for x in rk], variant="b").statistic)

    assert m["num_pairs"] == pairs
    assert m["pairwise_accuracy"] == pytest.approx(correct / pairs)
    assert m["num_top1_prompts"] == n_top1
    assert m["top1_accuracy"] == pytest.approx(top1 / n_top1)
    assert m["num_kendall_prompts"] == len(taus)
    assert m["kendall_tau"] == pytest.approx(float(np.mean(taus)))
    assert m["mean_reward_by_rank"] == {
        str(int(k)): pytest.approx(float(np.mean(v))) for k, v in sorted(by_rank.items())
    }
    assert m["num_prompts"] == B - 1 - int(np.sum(~mask[6:].any(axis=1)))
    assert m["num_answers"] == len(pooled_r)
    assert m["reward_mean"] == pytest.approx(float(np.mean(pooled_r)))
    assert m["reward_std"] == pytest.approx(float(np.std(pooled_r)))
    assert m["reward_length_correlation"] == pytest.approx(float(np.corrcoef(pooled_r, pooled_l)[0, 1]))

    # Answer order within prompts does not matter.
    perm = rng.permutation(K)
    m_perm = ranking_metrics(garbage[:, perm], ranks[:, perm], mask[:, perm], lengths[:, perm])
    for key in ("pairwise_accuracy", "top1_accuracy", "kendall_tau", "reward_length_correlation"):
        assert m_perm[key] == pytest.approx(m[key])


def test_perfect_and_reversed_rewards():
    ranks = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 2.0, 3.0]])
    mask = np.ones((2, 4), bool)
    lengths = np.ones((2, 4), int)
    good = -ranks * 1.5
    m = ranking_metrics(good, ranks, mask, lengths)
    assert m["pairwise_accuracy"] == 1.0 and m["top1_accuracy"] == 1.0 and m["kendall_tau"] == pytest.approx(1.0)
    m = ranking_metrics(-good, ranks, mask, lengths)
    assert m["pairwise_accuracy"] == 0.0 and m["top1_accuracy"] == 0.0 and m["kendall_tau"] == pytest.approx(-1.0)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        ranking_metrics(np.zeros((2, 3)), np.zeros((2, 4)), np.ones((2, 3), bool), np.ones((2, 3)))


def test_pooled_moments_stable_with_large_offset():
    rng = np.random.default_rng(1)
    rewards = 1e6 + rng.normal(size=(50, 4))
    lengths = rng.integers(1, 100, size=(50, 4))
    ranks = np.tile(np.arange(1.0, 5.0), (50, 1))
    mask = np.ones((50, 4), bool)
    acc = RankingMetrics()
    for b in range(50):
        acc.update(rewards[b : b + 1], ranks[b : b + 1], mask[b : b + 1], lengths[b : b + 1])
    m = acc.compute()
    assert m["reward_std"] == pytest.approx(float(np.std(rewards)), rel=1e-6)
    assert m["reward_length_correlation"] == pytest.approx(
        float(np.corrcoef(rewards.ravel(), lengths.ravel())[0, 1]), abs=1e-6
    )
