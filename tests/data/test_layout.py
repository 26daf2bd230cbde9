"""Shared-prefix and packed layouts (data/layout.py) against plain per-answer [B, K, L] batches.

The reference is the per-answer layout every earlier test proved against transformers: same model, same
parameters, the answers' full sequences one per row. Rewards, per-prompt losses and parameter gradients must
agree (fp32, 1e-5) for rows that share a prefix, rows that fall back to per-answer units, K < 7 and ties.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from starling_jax.data import layout
from starling_jax.losses.ranking import plackett_luce_loss
from starling_jax.model import attention as A
from starling_jax.model.config import ModelConfig
from starling_jax.model.heads import build_model, kwise_rewards
from starling_jax.train.rm_step import LossConfig, rm_loss
from starling_jax.train.step import split_micro_batches

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


def _prompts(seed=0):
    """Six prompts: 7 answers with a shared prompt; K < 7 (3 answers, 2 tied); a prompt too long to share
    (falls back to per-answer units); one answer only; ties; a prompt whose answers share no prefix."""
    rng = np.random.default_rng(seed)
    tok = lambda n: rng.integers(1, VOCAB, size=n).astype(np.int32)  # noqa: E731
    out = []
    for n_prompt, answer_lens, ranks in (
        (12, [5, 9, 3, 7, 4, 6, 8], [1, 2, 3, 4, 5, 6, 7]),
        (20, [6, 2, 11], [1, 2, 2]),
        (30, [20, 18, 25], [2, 1, 3]),  # 30 + 63 > L: fallback
        (9, [7], [1]),
        (5, [3, 3, 4, 2], [1, 1, 3, 3]),
        (0, [6, 5, 7], [3, 2, 1]),
    ):
        prompt = tok(n_prompt)
        out.append(([np.concatenate([prompt, tok(a)]) for a in answer_lens], ranks))
    return out


def _per_answer_batch(prompts):
    b = len(prompts)
    batch = {k: np.zeros((b, K, L), np.int32) for k in ("tokens", "positions", "segment_ids")}
    batch["reward_index"] = np.zeros((b, K), np.int32)
    batch["ranks"] = np.full((b, K), 1e9, np.float32)
    batch["answer_mask"] = np.zeros((b, K), bool)
    for i, (seqs, ranks) in enumerate(prompts):
        for k, s in enumerate(seqs):
            n = len(s)
            batch["tokens"][i, k, :n], batch["positions"][i, k, :n] = s, np.arange(n)
            batch["segment_ids"][i, k, :n] = 1
            batch["reward_index"][i, k] = n - 1
            batch["ranks"][i, k], batch["answer_mask"][i, k] = ranks[k], True
    return batch


def _packed_batch(prompts, **kw):
    ref = _per_answer_batch(prompts)
    arrays = layout.pack([seqs for seqs, _ in prompts], K, L, **kw)
    real = arrays.pop("real_tokens")
    return {**arrays, "ranks": ref["ranks"], "answer_mask": ref["answer_mask"]}, real


@pytest.fixture(scope="module")
def model_parts():
    return nnx.split(build_model(CFG, "reward", seed=1))


def _loss_and_grads(graphdef, params, batch, impl="einsum"):
    gd = graphdef if impl == "einsum" else nnx.split(build_model(CFG.replace(attention_impl=impl), "reward"))[0]

    def f(p):
        total, (count, rewards) = rm_loss(p, gd, batch, LossConfig())
        return total, rewards

    (total, rewards), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    per_prompt = plackett_luce_loss(rewards, jnp.asarray(batch["ranks"]), jnp.asarray(batch["answer_mask"]))[1]
    return np.asarray(rewards), np.asarray(per_prompt["per_prompt_loss"]), grads


def test_shared_prefix_length():
    a = np.array([1, 2, 3, 4]), np.array([1, 2, 3, 5, 6]), np.array([1, 2, 3])
    assert layout.shared_prefix_length(a) == 2  # the shortest keeps one token of its own
    assert layout.shared_prefix_length(a[:2]) == 3
    assert layout.shared_prefix_length([np.array([1, 2])]) == 0
    assert layout.shared_prefix_length([np.array([5, 2]), np.array([1, 2])]) == 0


def test_units_fall_back_when_the_shared_row_does_not_fit():
    prompts = _prompts()
    kinds = [
        [u.prefix > 0 for u in layout.units_of(i, seqs, "shared_prefix", L)] for i, (seqs, _) in enumerate(prompts)
    ]
    assert kinds == [[True], [True], [False] * 3, [False], [True], [False] * 3]
    # a prompt too long for one row is split: the prompt repeated, the next answers that fit after it
    seqs = [np.arange(1, 41), *(np.concatenate([np.arange(1, 31), np.full(n, 7)]) for n in (5, 6, 25))]
    parts = layout.units_of(0, seqs, "shared_prefix", L)
    assert [(u.answers, u.prefix, u.lengths) for u in parts] == [([0, 1, 2], 30, [10, 5, 6]), ([3], 0, [55])]


@pytest.fixture(scope="module")
def reference(model_parts):
    return _loss_and_grads(*model_parts, _per_answer_batch(_prompts()))


@pytest.mark.parametrize("impl,packing", [("einsum", False), ("blockwise", True)])
def test_shared_prefix_equals_per_answer(model_parts, reference, impl, packing):
    graphdef, params = model_parts
    prompts = _prompts()
    r_ref, l_ref, g_ref = reference
    packed, _ = _packed_batch(prompts, layout="shared_prefix", packing=packing)
    r, loss, grads = _loss_and_grads(graphdef, params, packed, impl)
    mask = _per_answer_batch(prompts)["answer_mask"]
    np.testing.assert_allclose(r[mask], r_ref[mask], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss, l_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    assert packed["tokens"].shape[0] < (6 if packing else 14)  # prompts share rows / prompts are not repeated


def test_packed_per_answer_equals_unpacked(model_parts, reference):
    graphdef, params = model_parts
    prompts = _prompts()
    r_ref, l_ref, g_ref = reference
    packed, _ = _packed_batch(prompts, layout="per_answer", packing=True)
    assert packed["tokens"].shape[0] < 20  # 21 answers in fewer rows
    r, loss, grads = _loss_and_grads(graphdef, params, packed)
    mask = _per_answer_batch(prompts)["answer_mask"]
    np.testing.assert_allclose(r[mask], r_ref[mask], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss, l_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_no_token_attends_across_prompts_or_sibling_answers(model_parts):
    prompts = _prompts()
    packed, _ = _packed_batch(prompts, layout="shared_prefix", packing=True)
    seg, pos = packed["segment_ids"], packed["positions"]
    mask = np.asarray(A.attention_mask(jnp.asarray(seg), jnp.asarray(pos), None))[:, 0, 0]
    for r in range(seg.shape[0]):
        qi, kj = np.nonzero(mask[r])
        # every allowed pair is inside one group / plain segment, and sibling answers never see each other
        assert np.all(seg[r, qi] // A.PREFIX_STRIDE == seg[r, kj] // A.PREFIX_STRIDE)
        plain = seg[r, kj] < A.PREFIX_STRIDE
        assert np.all(seg[r, qi][plain] == seg[r, kj][plain])
        answer_keys = (seg[r, kj] % A.PREFIX_STRIDE != 0) & ~plain
        assert np.all(seg[r, qi][answer_keys] == seg[r, kj][answer_keys])
    # outputs: changing every token of prompt 0 leaves every other prompt's rewards bit-identical
    graphdef, params = model_parts
    model = nnx.merge(graphdef, params)
    rewards = jax.jit(lambda b: kwise_rewards(model, b))
    before = np.asarray(rewards(packed))
    changed = dict(packed)
    changed["tokens"] = packed["tokens"].copy()
    for k in range(len(prompts[0][0])):
        r, end = packed["reward_row"][0, k], packed["reward_index"][0, k]
        start = end - int(pos[r, end])
        changed["tokens"][r, start : end + 1] = (changed["tokens"][r, start : end + 1] % (VOCAB - 1)) + 1
    after = np.asarray(rewards(changed))
    assert not np.allclose(after[0, :7], before[0, :7])
    np.testing.assert_array_equal(after[1:], before[1:])


def test_micro_batches_keep_each_prompt_with_its_rows(model_parts):
    graphdef, params = model_parts
    prompts = _prompts() + _prompts(seed=5)[:2]  # 8 prompts, 2 micro-batches
    packed, _ = _packed_batch(prompts, layout="shared_prefix", packing=True, micro_batches=2)
    full = _per_answer_batch(prompts)
    model = nnx.merge(graphdef, params)
    rewards = jax.jit(lambda b: kwise_rewards(model, b))
    ref = np.asarray(rewards({k: jnp.asarray(v) for k, v in full.items()}))
    micro = split_micro_batches({k: jnp.asarray(v) for k, v in packed.items()}, 2)
    for m in range(2):
        got = np.asarray(rewards(jax.tree.map(lambda x: x[m], micro)))
        sel = full["answer_mask"][m::2]
        np.testing.assert_allclose(got[sel], ref[m::2][sel], atol=1e-5, rtol=1e-5)


def test_packing_efficiency_and_refusals():
    prompts = _prompts()
    packed, real = _packed_batch(prompts, layout="per_answer", packing=True)
    eff, ratio = layout.efficiency({**packed, "real_tokens": real})
    assert ratio == 1.0 and eff > 0.75
    shared, real = _packed_batch(prompts, layout="shared_prefix", packing=True)
    eff2, ratio2 = layout.efficiency({**shared, "real_tokens": real})
    assert ratio2 < 0.75 and shared["tokens"].shape[0] <= packed["tokens"].shape[0]
    with pytest.raises(layout.DataError, match="needs .* rows"):
        layout.pack([seqs for seqs, _ in prompts], K, L, num_rows=1)
    with pytest.raises(layout.DataError, match="data.layout='nope'"):
        layout.pack([seqs for seqs, _ in prompts], K, L, layout="nope")


def _unpack(batch, b, k, micro=1):
    """The full sequence of answer (b, k) read back from a packed batch: its row's tokens whose segment is the
    answer's own or its group's prompt, up to the reward token (reward_row counts rows inside the micro-batch
    b belongs to: global row = local · micro + b mod micro)."""
    r, end = batch["reward_row"][b, k] * micro + b % micro, batch["reward_index"][b, k]
    seg = batch["segment_ids"][r]
    own = seg[end]
    keep = (seg == own) | ((own >= A.PREFIX_STRIDE) & (seg == own - own % A.PREFIX_STRIDE))
    keep[end + 1 :] = False
    return batch["tokens"][r][keep], batch["positions"][r][keep]


# row_multiple 3: the rows of each micro-batch are padded out to a multiple of 3 (3 data-parallel devices)
@pytest.mark.parametrize("mode,micro,row_multiple", [("eval", 1, 1), ("train", 2, 1), ("eval", 1, 3), ("train", 2, 3)])
def test_pipeline_packed_batches_hold_the_per_answer_sequences(mode, micro, row_multiple):
    from starling_jax.data.pipeline import InMemorySource, RankingPipeline
    from starling_jax.data.tokenize import TokenizedRanking

    rng = np.random.default_rng(7)
    examples = []
    for row, (seqs, ranks) in enumerate(_prompts(seed=11) * 3):
        seqs = [np.asarray(s) for s in seqs]
        examples.append(
            TokenizedRanking(
                row=row + 1,
                tokens=seqs,
                answer_start=np.zeros(len(seqs), np.int32),
                answer_lengths=np.asarray([len(s) for s in seqs], np.int32),
                reward_index=np.asarray([len(s) - 1 for s in seqs], np.int32),
                ranks=np.asarray(ranks, np.float32),
            )
        )
    rng.shuffle(examples)
    common = dict(
        global_batch_size=4,
        num_answers=K,
        max_length=L,
        pad_to_multiple=32,
        mode=mode,
        process_index=0,
        process_count=1,
        seed=3,
    )
    ref = RankingPipeline(InMemorySource(examples), **common)
    packed = RankingPipeline(
        InMemorySource(examples),
        layout="shared_prefix",
        packing=True,
        micro_batches=micro,
        row_multiple=row_multiple,
        **common,
    )
    rows = packed.rows_per_host(0)
    for step in range(3):
        a, b = ref.host_batch(0, step), packed.host_batch(0, step)
        assert b["tokens"].shape == (rows, L) and rows % (micro * row_multiple) == 0
        np.testing.assert_array_equal(a["ranks"], b["ranks"])
        np.testing.assert_array_equal(a["answer_mask"], b["answer_mask"])
        for i, k in zip(*np.nonzero(a["answer_mask"])):
            n = a["reward_index"][i, k] + 1
            toks, pos = _unpack(b, i, k, micro)
            np.testing.assert_array_equal(toks, a["tokens"][i, k, :n])
            np.testing.assert_array_equal(pos, np.arange(n))
    packed.close()
    ref.close()


def test_run_config_refuses_a_layout_the_attention_cannot_handle():
    from starling_jax.errors import ConfigError
    from starling_jax.train.rm_config import DataConfig, RMRunConfig, tiny_model
    from starling_jax.train.runtime import RuntimeConfig

    RMRunConfig(
        data=DataConfig(layout="shared_prefix", packing=True), runtime=RuntimeConfig(attention_impl="blockwise")
    )
    with pytest.raises(ConfigError, match="runtime.attention_impl=fused cannot handle data.layout=packed"):
        RMRunConfig(data=DataConfig(packing=True), runtime=RuntimeConfig(attention_impl="fused"))
    # splash takes shared prefixes unless the model's window is shorter than the rows (its window is in indices)
    RMRunConfig(
        data=DataConfig(layout="shared_prefix", max_length=256),
        model=tiny_model().replace(sliding_window=4096),
        runtime=RuntimeConfig(attention_impl="splash"),
    )
    refused = r"{} cannot handle data.layout=shared_prefix with a sliding window \(128\)"
    for impl in ("splash", "auto"):  # the default auto is splash on a TPU
        with pytest.raises(ConfigError, match=refused.format(impl)):
            RMRunConfig(
                data=DataConfig(layout="shared_prefix", max_length=256),
                model=tiny_model().replace(sliding_window=128),
                runtime=RuntimeConfig(attention_impl=impl),
            )
