"""The RL prompts' iterator: batches of prompt row ids in a seeded order on the shared resumable base. Apart from
`data/prompts.py` (reading prompts) so that the entry points reading prompts (`generate`, `gather_answers`) do not
import numpy for `--help`."""

from __future__ import annotations

import numpy as np

from starling_jax.data.resumable import ResumableIterator


class PromptIterator(ResumableIterator):
    """Batches `{"row": [batch_size] prompt row ids}` in a seeded order, reshuffled every epoch (the rows left
    over at an epoch's end are not served); the position is `ResumableIterator`'s."""

    def __init__(self, rows: list[int], batch_size: int, seed: int):
        self.rows, self.global_batch_size, self.seed = np.asarray(rows), int(batch_size), int(seed)
        self.epoch = self.batch = 0

    @property
    def num_examples(self) -> int:
        return len(self.rows)

    @property
    def num_batches_per_epoch(self) -> int:
        return len(self.rows) // self.global_batch_size

    def fetch(self, epoch: int, batch: int) -> dict:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
        return {"row": order[batch * self.global_batch_size : (batch + 1) * self.global_batch_size]}
