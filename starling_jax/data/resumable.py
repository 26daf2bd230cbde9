"""The resumable batch iterator every job's data is: an exact position that a checkpoint stores and a resumed run
restores, in one format for the three iterators (`pipeline.RankingPipeline`, `sft.SFTPipeline`,
`prompts.PromptIterator`).

    state() = {"epoch": int, "batch": int, "seed": int, "global_batch_size": int, "num_examples": int}

`batch` counts the batches already served in `epoch`. `mode="train"` cycles epochs forever (a subclass reshuffles
per epoch); `mode="eval"` makes one pass and starts over at the next `iter()`. `restore` refuses a position taken
with another seed, batch size or dataset size (one line naming both values), and still reads the position of
checkpoints written before this format: PPO's prompt iterator stored `{"epoch", "position"}` (rows served), and
the ranking pipeline also stored `mode`.
"""

from __future__ import annotations

import abc

from starling_jax.errors import DataError

CHECKED_KEYS = ("seed", "global_batch_size", "num_examples")


class ResumableIterator(abc.ABC):
    """Subclasses set `seed`, `global_batch_size`, `mode` and implement `num_examples`, `num_batches_per_epoch`
    and `fetch(epoch, batch)`; the position, its state and the epoch/eval bookkeeping are here."""

    seed: int
    global_batch_size: int
    mode: str = "train"
    epoch: int = 0
    batch: int = 0

    @property
    @abc.abstractmethod
    def num_examples(self) -> int: ...

    @property
    @abc.abstractmethod
    def num_batches_per_epoch(self) -> int: ...

    @abc.abstractmethod
    def fetch(self, epoch: int, batch: int) -> dict:
        """The host batch at (epoch, batch): called in order, once per position (a prefetching subclass may
        ignore the arguments and read its own stream, restarted by `on_restore`)."""

    def on_restore(self) -> None:
        """The position changed outside `__next__` (a restore or a new eval pass): drop any read-ahead."""

    # -- state
    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_examples": self.num_examples,
        }

    def restore(self, state: dict) -> None:
        for key in CHECKED_KEYS:
            if key in state and int(state[key]) != int(getattr(self, key)):
                raise DataError(f"data state: {key} is {state[key]} in the checkpoint but {getattr(self, key)} now")
        if "batch" in state:
            batch = int(state["batch"])
        elif "position" in state:  # PPO checkpoints before this format: rows served in the epoch
            batch = int(state["position"]) // self.global_batch_size
        else:
            raise DataError(f"data state {state}: neither 'batch' nor 'position' (not a data position)")
        self.epoch, self.batch = int(state["epoch"]), batch
        self.on_restore()

    # -- iteration
    def __iter__(self):
        if self.mode == "eval" and (self.epoch, self.batch) != (0, 0):
            self.epoch, self.batch = 0, 0
            self.on_restore()
        return self

    def __next__(self) -> dict:
        if self.mode == "eval" and self.batch >= self.num_batches_per_epoch:
            raise StopIteration
        out = self.fetch(self.epoch, self.batch)
        self.batch += 1
        if self.mode == "train" and self.batch >= self.num_batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return out
