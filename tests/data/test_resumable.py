"""The one resumable iterator base (`data/resumable.py`), through PPO's prompt iterator: one state format, an exact
resume, a refused mismatch, and the position of checkpoints written before the format."""

from __future__ import annotations

import numpy as np
import pytest

from starling_jax.data.prompt_iterator import PromptIterator
from starling_jax.errors import DataError


def take(it, n: int) -> list[list[int]]:
    return [next(it)["row"].tolist() for _ in range(n)]


def test_prompt_iterator_resumes_exactly_across_epochs():
    straight = iter(PromptIterator(list(range(10)), 3, seed=5))  # 3 batches per epoch, one row left over
    first = take(straight, 4)
    assert len(set(sum(first[:3], []))) == 9  # an epoch serves 9 distinct rows
    state = straight.state()
    assert state == {"epoch": 1, "batch": 1, "seed": 5, "global_batch_size": 3, "num_examples": 10}
    resumed = PromptIterator(list(range(10)), 3, seed=5)
    resumed.restore(state)
    assert take(iter(resumed), 5) == take(straight, 5)
    # the order is a seeded permutation per epoch (not the rows in file order)
    np.testing.assert_array_equal(
        np.sort(first[0] + first[1] + first[2]), np.sort(np.random.default_rng([5, 0]).permutation(10)[:9])
    )


def test_old_prompt_position_is_read_and_a_mismatch_is_refused():
    it = PromptIterator(list(range(10)), 3, seed=5)
    it.restore({"epoch": 2, "position": 6})  # PPO checkpoints before the shared format: rows served
    assert (it.epoch, it.batch) == (2, 2)
    with pytest.raises(DataError, match="seed is 4 in the checkpoint but 5 now"):
        it.restore({"epoch": 0, "batch": 0, "seed": 4})
