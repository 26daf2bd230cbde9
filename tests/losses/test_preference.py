"""Tests of starling_jax.losses.preference: K-wise DPO against a brute-force Plackett-Luce probability over all
orderings, and the pairwise / IPO losses against trl's own DPOTrainer loss code (called on the same log-probs)."""

import itertools
import math
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starling_jax.losses.preference import (
    implied_rewards,
    ipo_loss,
    kwise_dpo_loss,
    pairwise_dpo_loss,
)

kwise = jax.jit(kwise_dpo_loss, static_argnames=("beta",))
pairwise = jax.jit(pairwise_dpo_loss, static_argnames=("beta", "label_smoothing", "pairs"))
ipo = jax.jit(ipo_loss, static_argnames=("beta", "pairs"))


def pl_probability(rewards, order):
    """P(order) = Π_j exp(r_order[j]) / Σ_{k≥j} exp(r_order[k]), plain python."""
    p = 1.0
    for j in range(len(order)):
        p *= math.exp(rewards[order[j]]) / sum(math.exp(rewards[order[k]]) for k in range(j, len(order)))
    return p


def breslow_nll(rewards, ranks):
    """−Σ_j [r_j − log Σ_{k: rank_k ≥ rank_j} exp(r_k)] (the reward model's tie rule), python loop."""
    return -sum(
        rewards[j] - math.log(sum(math.exp(rewards[k]) for k in range(len(rewards)) if ranks[k] >= ranks[j]))
        for j in range(len(rewards))
    )


def random_logps(rng, k):
    return rng.normal(size=k) * 3.0 - 20.0, rng.normal(size=k) * 3.0 - 20.0


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_kwise_equals_brute_force_plackett_luce_over_all_orderings(k):
    rng = np.random.default_rng(k)
    beta = 0.3
    for _ in range(3):
        pol, ref = random_logps(rng, k)
        ranks = rng.permutation(k) + 1.0
        rewards = [beta * (p - r) for p, r in zip(pol, ref)]
        probs = {perm: pl_probability(rewards, perm) for perm in itertools.permutations(range(k))}
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)  # a distribution over all orderings
        expected = -math.log(probs[tuple(int(i) for i in np.argsort(ranks))])
        with jax.enable_x64(True):
            loss, aux = kwise(
                jnp.asarray(pol[None]),
                jnp.asarray(ref[None]),
                jnp.asarray(ranks[None]),
                np.ones((1, k), bool),
                beta=beta,
            )
            np.testing.assert_allclose(float(loss), expected, rtol=1e-12, atol=1e-12)
        loss32, _ = kwise(
            pol[None].astype(np.float32),
            ref[None].astype(np.float32),
            ranks[None].astype(np.float32),
            np.ones((1, k), bool),
            beta=beta,
        )
        np.testing.assert_allclose(float(loss32), expected, rtol=1e-4, atol=1e-4)


def test_kwise_ties_as_the_reward_model_and_masks():
    rng = np.random.default_rng(4)
    beta = 0.5
    pol, ref = rng.normal(size=(8, 6)) - 10, rng.normal(size=(8, 6)) - 10
    ranks = rng.integers(1, 4, size=(8, 6)).astype(float)
    mask = np.ones((8, 6), bool)
    mask[2, 4:] = False
    pol_garbage = pol.copy()
    pol_garbage[2, 4:] = np.nan  # masked answers never reach the loss
    _, aux = kwise(pol_garbage.astype(np.float32), ref.astype(np.float32), ranks.astype(np.float32), mask, beta=beta)
    want = [breslow_nll(list(beta * (p[m] - r[m])), list(rk[m])) for p, r, rk, m in zip(pol, ref, ranks, mask)]
    np.testing.assert_allclose(np.asarray(aux["per_prompt_loss"]), want, rtol=1e-5)
    grad = jax.grad(lambda p: kwise_dpo_loss(p, ref, ranks, mask, beta=beta)[0])(pol_garbage.astype(np.float32))
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[2, 4:] == 0)


def test_kwise_at_k2_is_sigmoid_dpo():
    pol = np.array([[-10.0, -12.5], [-7.0, -6.0]], np.float32)
    ref = np.array([[-11.0, -11.0], [-6.5, -6.8]], np.float32)
    ranks = np.array([[1, 2], [2, 1]], np.float32)
    beta = 0.2
    h = [(pol[0, 0] - ref[0, 0]) - (pol[0, 1] - ref[0, 1]), (pol[1, 1] - ref[1, 1]) - (pol[1, 0] - ref[1, 0])]
    expected = np.mean([-math.log(1 / (1 + math.exp(-beta * x))) for x in h])
    mask = np.ones((2, 2), bool)
    np.testing.assert_allclose(float(kwise(pol, ref, ranks, mask, beta=beta)[0]), expected, rtol=1e-6)
    np.testing.assert_allclose(float(pairwise(pol, ref, ranks, mask, beta=beta)[0]), expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ trl
def trl_dpo_loss(
    loss_type: str,
    chosen,
    rejected,
    ref_chosen,
    ref_rejected,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_len=None,
    rejected_len=None,
) -> float:
    """trl's `DPOTrainer._compute_loss` run on given sequence log-probs: a stand-in model returns per-token
    log-probs whose sums are those (precomputed reference log-probs, as trl's `precompute_ref_log_probs`)."""
    import torch
    from trl import DPOTrainer

    n = len(chosen)
    lengths = list(chosen_len if chosen_len is not None else [1] * n) + list(
        rejected_len if rejected_len is not None else [1] * n
    )
    t = max(lengths)
    log_probs = torch.zeros(2 * n, t, dtype=torch.float64)
    log_probs[:, 0] = torch.tensor(list(chosen) + list(rejected), dtype=torch.float64)
    completion_mask = torch.zeros(2 * n, t + 1, dtype=torch.long)
    for i, m in enumerate(lengths):
        completion_mask[i, 1 : 1 + m] = 1
    outputs = SimpleNamespace(
        log_probs=log_probs,
        entropy=torch.zeros(2 * n, t),
        mean_logits=torch.zeros(2 * n, t),
        is_top1=torch.zeros(2 * n, t, dtype=torch.bool),
    )
    accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * n, t + 1, dtype=torch.long),
        "attention_mask": completion_mask.clone(),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor(ref_chosen, dtype=torch.float64),
        "ref_rejected_logps": torch.tensor(ref_rejected, dtype=torch.float64),
    }
    return float(DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False))


def ordered_pairs(ranks, mask, best_vs_rest=False):
    best = min(r for r, m in zip(ranks, mask) if m)
    return [
        (j, k)
        for j in range(len(ranks))
        for k in range(len(ranks))
        if mask[j] and mask[k] and ranks[j] < ranks[k] and (not best_vs_rest or ranks[j] == best)
    ]


@pytest.mark.parametrize("pairs", ["all", "best_vs_rest"])
def test_pairwise_equals_trl_sigmoid_dpo_on_every_ordered_pair(pairs):
    pytest.importorskip("trl")
    rng = np.random.default_rng(7)
    beta = 0.25
    pol, ref = rng.normal(size=(3, 5)) * 4 - 30, rng.normal(size=(3, 5)) * 4 - 30
    ranks = np.array([[1, 2, 3, 4, 5], [2, 1, 2, 3, 3], [1, 1, 2, 4, 9]], np.float64)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    per_prompt = []
    for b in range(3):
        pp = ordered_pairs(ranks[b], mask[b], pairs == "best_vs_rest")
        j, k = np.array(pp).T
        # trl's loss is the mean over the pairs of its batch: one call per prompt
        per_prompt.append(trl_dpo_loss("sigmoid", pol[b, j], pol[b, k], ref[b, j], ref[b, k], beta))
    with jax.enable_x64(True):
        loss, aux = pairwise(jnp.asarray(pol), jnp.asarray(ref), jnp.asarray(ranks), mask, beta=beta, pairs=pairs)
    np.testing.assert_allclose(np.asarray(aux["per_prompt_loss"]), per_prompt, rtol=1e-12)
    np.testing.assert_allclose(float(loss), np.mean(per_prompt), rtol=1e-12)


def test_pairwise_label_smoothing_equals_trl():
    """trl 1.x applies `label_smoothing` to the sigmoid term in its `aot` loss, which on a batch of one pair (its
    sort over the batch is then the identity) is −(1−ε) log σ(βh) − ε log σ(−βh)."""
    pytest.importorskip("trl")
    rng = np.random.default_rng(8)
    beta, eps = 0.5, 0.2
    pol, ref = rng.normal(size=(1, 4)) * 3 - 15, rng.normal(size=(1, 4)) * 3 - 15
    ranks = np.array([[3, 1, 2, 4]], np.float64)
    pairs = ordered_pairs(ranks[0], [True] * 4)
    want = np.mean(
        [trl_dpo_loss("aot", [pol[0, j]], [pol[0, k]], [ref[0, j]], [ref[0, k]], beta, eps) for j, k in pairs]
    )
    with jax.enable_x64(True):
        loss, _ = pairwise(
            jnp.asarray(pol),
            jnp.asarray(ref),
            jnp.asarray(ranks),
            np.ones((1, 4), bool),
            beta=beta,
            label_smoothing=eps,
        )
    np.testing.assert_allclose(float(loss), want, rtol=1e-12)
    # and ε = 0 is trl's sigmoid on the same pairs
    j, k = np.array(pairs).T
    with jax.enable_x64(True):
        loss0, _ = pairwise(jnp.asarray(pol), jnp.asarray(ref), jnp.asarray(ranks), np.ones((1, 4), bool), beta=beta)
    np.testing.assert_allclose(
        float(loss0), trl_dpo_loss("sigmoid", pol[0, j], pol[0, k], ref[0, j], ref[0, k], beta), rtol=1e-12
    )


def test_ipo_equals_trl_ipo_with_its_length_normalization():
    pytest.importorskip("trl")
    rng = np.random.default_rng(9)
    beta = 0.1
    pol, ref = rng.normal(size=(1, 4)) * 3 - 15, rng.normal(size=(1, 4)) * 3 - 15
    lengths = np.array([[5, 9, 3, 7]])
    ranks = np.array([[2, 1, 4, 3]], np.float64)
    j, k = np.array(ordered_pairs(ranks[0], [True] * 4)).T
    want = trl_dpo_loss(
        "ipo", pol[0, j], pol[0, k], ref[0, j], ref[0, k], beta, chosen_len=lengths[0, j], rejected_len=lengths[0, k]
    )
    with jax.enable_x64(True):
        loss, _ = ipo(
            jnp.asarray(pol),
            jnp.asarray(ref),
            jnp.asarray(ranks),
            np.ones((1, 4), bool),
            beta=beta,
            completion_lengths=jnp.asarray(lengths),
        )
    np.testing.assert_allclose(float(loss), want, rtol=1e-12)


def test_implied_rewards_and_no_valid_prompt():
    np.testing.assert_allclose(np.asarray(implied_rewards(np.array([-3.0]), np.array([-5.0]), 0.5)), [1.0])
    mask = np.array([[True, False]])
    for fn in (
        lambda p: kwise_dpo_loss(p, p, np.ones((1, 2)), mask, beta=0.1),
        lambda p: pairwise_dpo_loss(p, p, np.ones((1, 2)), mask, beta=0.1),
    ):
        loss, aux = fn(np.zeros((1, 2), np.float32))
        assert float(loss) == 0.0 and float(aux["num_valid_prompts"]) == 0.0
