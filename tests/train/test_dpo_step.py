"""The DPO step (train/dpo_step.py): answer log-probs against a direct per-sequence computation, shared-prefix and
packed batches against one answer per row (log-probs, loss, gradients), micro-batches, the frozen reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from starling_jax.data.pipeline import InMemorySource, RankingPipeline
from starling_jax.data.tokenize import TokenizedRanking
from starling_jax.losses.ranking import plackett_luce_loss
from starling_jax.model.config import ModelConfig
from starling_jax.model.heads import build_model
from starling_jax.train import dpo_step
from starling_jax.train.dpo_config import DPOLossConfig
from starling_jax.train.optimizer import OptimConfig, make_optimizer
from starling_jax.train.state import init_train_state
from starling_jax.train.step import accumulate_gradients
from tests.model.hf_fixtures import one_device_mesh

K, L, VOCAB = 7, 64, 97
CFG = ModelConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
)


def _examples(seed=0):
    """Rankings whose answers start after a shared prompt; in some, every answer also begins with the same token
    (the shared prefix would reach into the answers), one prompt too long to share a row, K < 7, ties."""
    rng = np.random.default_rng(seed)
    tok = lambda n: rng.integers(1, VOCAB, size=n).astype(np.int32)
    out = []
    for row, (n_prompt, answer_lens, ranks, common) in enumerate(
        (
            (12, [5, 9, 3, 7, 4, 6, 8], [1, 2, 3, 4, 5, 6, 7], 0),
            (20, [6, 2, 11], [1, 2, 2], 2),  # answers share their first 2 tokens
            (30, [20, 18, 25], [2, 1, 3], 0),  # too long to share a row: per-answer units
            (5, [3, 3, 4, 2], [1, 1, 3, 3], 1),
            (9, [7, 4], [2, 1], 0),
            (7, [4, 6, 5], [3, 1, 2], 3),
        )
    ):
        prompt, head = tok(n_prompt), tok(common)
        seqs = [np.concatenate([prompt, head, tok(a - common)]) for a in answer_lens]
        out.append(
            TokenizedRanking(
                row=row + 1,
                tokens=seqs,
                answer_start=np.full(len(seqs), n_prompt, np.int32),
                answer_lengths=np.asarray(answer_lens, np.int32),
                reward_index=np.asarray([len(s) - 1 for s in seqs], np.int32),
                ranks=np.asarray(ranks, np.float32),
            )
        )
    return out


def _batch(examples, **layout) -> dict:
    pipe = RankingPipeline(
        InMemorySource(examples),
        global_batch_size=len(examples),
        num_answers=K,
        max_length=L,
        pad_to_multiple=32,
        mode="eval",
        process_index=0,
        process_count=1,
        completions=True,
        **layout,
    )
    batch = pipe.host_batch(0, 0)
    pipe.close()
    return batch


@pytest.fixture(scope="module")
def models():
    graphdef, policy = nnx.split(build_model(CFG, "causal_lm", seed=1))
    _, reference = nnx.split(build_model(CFG, "causal_lm", seed=2))  # ≠ policy: log-ratios are not all 0
    return graphdef, policy, reference


def _direct_logps(graphdef, params, examples, rows) -> np.ndarray:
    """Σ log softmax over each answer's tokens after the prompt, every sequence in a row of its own (numpy sums
    of the model's plain [N, L] forward); `rows`: the batch's input row of each prompt."""
    seqs = [
        (b, slot, ex.tokens[j], int(ex.answer_start[j]))
        for b, r in enumerate(rows)
        if r >= 0
        for ex in [next(e for e in examples if e.row == r)]
        for slot, j in enumerate(np.argsort(ex.ranks, kind="stable"))
    ]  # the pipeline stores answers best-first
    tokens = np.zeros((len(seqs), L), np.int32)
    for i, (_, _, t, _) in enumerate(seqs):
        tokens[i, : len(t)] = t
    positions = np.broadcast_to(np.arange(L, dtype=np.int32), tokens.shape)
    logits = jax.jit(lambda p, t, pos, s: nnx.merge(graphdef, p)(t, pos, s))(
        params, tokens, positions, (tokens > 0).astype(np.int32)
    )
    lp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
    out = np.zeros((len(rows), K))
    for i, (b, slot, t, start) in enumerate(seqs):
        out[b, slot] = sum(lp[i, c - 1, int(t[c])] for c in range(start, len(t)))
    return out


def _loss_and_grads(graphdef, policy, reference, batch, loss_cfg=DPOLossConfig(), micro=1):
    device = {k: jnp.asarray(v) for k, v in dpo_step.spec_of(batch).select(batch).items()}
    fn = functools.partial(
        dpo_step.dpo_loss, ref_params=reference, graphdef=graphdef, ref_graphdef=graphdef, loss_cfg=loss_cfg
    )
    total, count, grads, aux = jax.jit(lambda p, b: accumulate_gradients(fn, p, b, micro))(policy, device)
    return float(total / count), aux, grads


@pytest.fixture(scope="module")
def per_answer(models):
    examples = _examples()
    batch = _batch(examples)
    return examples, batch, _loss_and_grads(*models, batch, DPOLossConfig(beta=0.5))


def test_answer_logprobs_equal_each_sequence_alone(models, per_answer):
    graphdef, policy, reference = models
    examples, batch, (_, aux, _) = per_answer
    mask = batch["answer_mask"]
    np.testing.assert_allclose(
        np.asarray(aux["policy_logps"])[mask], _direct_logps(graphdef, policy, examples, batch["row"])[mask], rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(aux["reference_logps"])[mask],
        _direct_logps(graphdef, reference, examples, batch["row"])[mask],
        rtol=1e-5,
    )
    # every answer token counts (answer text and template suffix), not the prompt
    b = int(np.flatnonzero(batch["row"] == 1)[0])
    ex = examples[0]
    assert batch["completion_lengths"][b, 0] == len(ex.tokens[0]) - ex.answer_start[0]


SHARED, SHARED_PACKED, PACKED = (
    {"layout": "shared_prefix"},
    {"layout": "shared_prefix", "packing": True},
    {"layout": "per_answer", "packing": True},
)


@pytest.mark.parametrize(
    "layout,loss",
    [
        (SHARED, "kwise"),
        (SHARED_PACKED, "kwise"),
        (PACKED, "kwise"),
        (SHARED_PACKED, "pairwise"),
        (SHARED_PACKED, "ipo"),
    ],
)
def test_shared_prefix_and_packed_equal_one_answer_per_row(models, per_answer, layout, loss):
    examples, ref_batch, ref_out = per_answer
    loss_cfg = DPOLossConfig(name=loss, beta=0.5)
    if loss != "kwise":
        ref_out = _loss_and_grads(*models, ref_batch, loss_cfg)
    batch = _batch(examples, **layout)
    assert batch["tokens"].ndim == 2 and batch["tokens"].shape[0] < 21  # rows shared by prompts or answers
    value, aux, grads = _loss_and_grads(*models, batch, loss_cfg)
    ref_value, ref_aux, ref_grads = ref_out
    mask = ref_batch["answer_mask"]
    for key in ("policy_logps", "reference_logps"):
        np.testing.assert_allclose(np.asarray(aux[key])[mask], np.asarray(ref_aux[key])[mask], rtol=1e-5)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    assert value > 0 and max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


def test_shared_prefix_stops_at_the_answers(models):
    """Answers that share their first tokens still keep them in their own segments (the prefix is capped)."""
    batch = _batch(_examples()[1:2], layout="shared_prefix")
    seg = batch["segment_ids"][0]
    assert np.sum(seg == 1 << 16) == 20  # the prompt only, not the 2 answer tokens every answer starts with


def test_micro_batches_of_packed_rows_equal_the_full_batch(models):
    examples = _examples() * 2
    loss_cfg = DPOLossConfig(name="kwise", beta=0.5)
    full = _loss_and_grads(*models, _batch(examples, layout="shared_prefix", packing=True), loss_cfg)
    micro = _loss_and_grads(
        *models, _batch(examples, layout="shared_prefix", packing=True, micro_batches=2), loss_cfg, micro=2
    )
    np.testing.assert_allclose(micro[0], full[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(micro[2]), jax.tree.leaves(full[2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_train_steps_move_the_policy_not_the_reference(models):
    graphdef, policy, _ = models
    mesh = one_device_mesh()
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2), 10)
    policy = jax.tree.map(lambda x: jnp.array(x, copy=True), policy)
    reference = jax.tree.map(lambda x: jnp.array(x, copy=True), policy)  # the starting weights
    before = jax.tree.map(np.array, reference)
    state, shardings = init_train_state(policy, jax.tree.map(lambda x: x.sharding, policy), tx, mesh, 0)
    batch = _batch(_examples(), layout="shared_prefix", packing=True)
    spec = dpo_step.dpo_specs(True, False)[0]
    step = dpo_step.jit_train_step(
        graphdef,
        graphdef,
        tx,
        schedule,
        DPOLossConfig(beta=0.5),
        1,
        mesh,
        shardings,
        jax.tree.map(lambda x: x.sharding, reference),
        spec.shardings(mesh),
    )
    losses = []
    for _ in range(3):
        state, metrics = step(state, reference, {k: jnp.asarray(v) for k, v in spec.select(batch).items()})
        losses.append(float(metrics["loss"]))
    # step 1: policy = reference, every implied reward 0 (the loss of equal rewards); then the loss falls
    uniform = plackett_luce_loss(np.zeros(batch["ranks"].shape), batch["ranks"], batch["answer_mask"])[0]
    assert losses[0] == pytest.approx(float(uniform), rel=1e-5) and losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)  # bit for bit
    assert any(
        not np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before))
    )
