"""Length-bucketed reward scoring (score_batches.py): the same rewards as one unpadded forward per sequence, in input
order, from a bounded number of padded shapes, on 1 and 8 devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from starling_jax.eval.score_batches import BucketedScorer, bucket_lengths, plan_micro_batches
from starling_jax.model.config import ModelConfig
from starling_jax.model.create import create_sharded
from starling_jax.parallel import sharding

CFG = ModelConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=None,
)
# Very different lengths, not sorted, with duplicates and a 1-token row.
LENGTHS = [3, 300, 17, 1, 129, 64, 250, 17, 2]


def test_bucket_lengths_by_hand():
    # 128 → ⌈181.02⌉=182 → 256 → ⌈362.04⌉ → 384 → 544 → 640 → 906 → 1024 → 1449 → 1536 → 2173 → capped at 2048
    assert bucket_lengths(2048, 128) == [128, 256, 384, 640, 1024, 1536, 2048]
    assert bucket_lengths(2000, 128)[-1] == 2048  # the last bucket holds max_length, rounded up to the multiple
    assert bucket_lengths(100, 128) == [128]
    assert bucket_lengths(64, 8, growth=2.0) == [8, 16, 32, 64]
    assert bucket_lengths(40, 16, growth=1.01) == [16, 32, 48]  # grows by at least one multiple
    with pytest.raises(ValueError):
        bucket_lengths(64, 8, growth=1.0)


def test_plan_covers_every_row_once_in_the_smallest_bucket():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 321, 101)
    buckets = bucket_lengths(320, 16)
    plan = plan_micro_batches(lengths, 8, buckets)
    seen = np.concatenate([idx for idx, _ in plan])
    assert sorted(seen.tolist()) == list(range(101))
    assert all(len(idx) == 8 for idx, _ in plan[:-1]) and len(plan[-1][0]) == 101 % 8
    longest = [int(lengths[idx].max()) for idx, _ in plan]
    assert longest == sorted(longest, reverse=True)  # longest micro-batch first
    for (_, padded), top in zip(plan, longest):
        assert padded in buckets and padded >= top
        assert all(b < top for b in buckets if b < padded)  # no smaller bucket would hold it
    with pytest.raises(ValueError, match="longer than the longest bucket"):
        plan_micro_batches([321], 8, buckets)


@pytest.fixture(scope="module")
def model():
    """A tiny fp32 reward model, random sequences of very different lengths (unsorted, a duplicate, a 1-token row),
    reward indices (every third one inside the sequence, the others at its last token), and the reference rewards:
    one forward per sequence at its own length (no padding, no batching)."""
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    graphdef, params = create_sharded(CFG, "reward", mesh, seed=0)
    rng = np.random.default_rng(1)
    sequences = [rng.integers(1, CFG.vocab_size, n).astype(np.int32) for n in LENGTHS]
    reward_index = [int(rng.integers(0, n)) if s % 3 == 0 else n - 1 for s, n in enumerate(LENGTHS)]
    forward = jax.jit(lambda p, t, pos, seg, i: nnx.merge(graphdef, p).rewards(t, pos, seg, i))
    want = np.asarray(
        [
            float(
                forward(
                    params,
                    t[None],
                    np.arange(len(t), dtype=np.int32)[None],
                    np.ones((1, len(t)), np.int32),
                    np.asarray([i], np.int32),
                )[0]
            )
            for t, i in zip(sequences, reward_index)
        ],
        np.float32,
    )
    return graphdef, params, sequences, reward_index, want


@pytest.mark.parametrize("n_dev", [1, 8])
def test_bucketed_rewards_equal_unbatched_in_input_order(model, n_dev):
    graphdef, params, sequences, reward_index, want = model
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:n_dev])
    params = jax.device_put(params, sharding.replicated(mesh))
    scorer = BucketedScorer(graphdef, mesh, rows=3, max_length=320, pad_to_multiple=16, pad_id=0)
    assert scorer.rows == (3 if n_dev == 1 else 8)  # rounded up to the data-parallel size
    got = scorer(params, sequences, reward_index)
    assert got.dtype == np.float32 and got.shape == (len(LENGTHS),)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert len(set(np.round(want, 4))) == len(LENGTHS)  # distinct rewards: any permuted order would fail

    # The default reward index is each sequence's last token.
    last = [s for s, n in enumerate(LENGTHS) if reward_index[s] == n - 1]
    np.testing.assert_allclose(scorer(params, sequences)[last], want[last], rtol=1e-5, atol=1e-5)
    # Padded shapes (= compiled programs) come from the bucket ladder only.
    assert scorer.shapes <= {(scorer.rows, b) for b in scorer.buckets} and len(scorer.buckets) == 8
    assert scorer._fn._cache_size() == len(scorer.shapes)


def test_bad_reward_index_is_refused(model):
    graphdef, params = model[:2]
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    scorer = BucketedScorer(graphdef, mesh, rows=2, max_length=32, pad_to_multiple=16)
    with pytest.raises(ValueError, match="reward_index"):
        scorer(params, [np.ones(4, np.int32)], [4])
    with pytest.raises(ValueError, match="empty sequence"):
        scorer(params, [np.ones(0, np.int32)])
