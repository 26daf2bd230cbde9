"""Batch specs: a batch's field names, dtypes, logical axes and pad values, declared once.

Shardings (the leading batch axis over every data-parallel mesh axis), abstract shapes for `aot`, the selection of
the fields a step reads and padding rows all follow from a spec. The K-wise batch (`KWISE`), the SFT batch
(`SFT`) and RL's rollout and experience batches (`ROLLOUT`, `EXPERIENCE`) are specs.

Logical dims are named by letters: B (prompts / sequences, the sharded axis), K (answers), L (tokens); RL's S
(prompt + response tokens) and T (response tokens).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple[str, ...]  # logical dims, the first one is always "B"
    pad: float | int | bool = 0  # value of padding rows / positions
    on_device: bool = True  # False: host-only (row ids for logs), never sent to the step


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    name: str
    fields: tuple[Field, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def device_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.on_device)

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)

    def only(self, *names: str, name: str | None = None) -> "BatchSpec":
        """The sub-spec of these fields (e.g. what the train step reads)."""
        return BatchSpec(name or self.name, tuple(self.field(n) for n in names))

    def select(self, batch: Mapping) -> dict:
        """The device fields of `batch` (extra keys dropped; a missing key is a KeyError naming it)."""
        return {k: batch[k] for k in self.device_names}

    def shapes(self, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {f.name: tuple(int(dims[d]) for d in f.dims) for f in self.fields if f.on_device}

    def shardings(self, mesh) -> dict:
        """NamedSharding per device field: the B axis over every data-parallel mesh axis, the rest whole."""
        from starling_jax.parallel import sharding  # jax-free import of data/ for prepare_data's fast path

        return {f.name: sharding.batch_sharding(mesh, len(f.dims)) for f in self.fields if f.on_device}

    def abstract(self, dims: Mapping[str, int], mesh) -> dict:
        """ShapeDtypeStructs with shardings: the batch an ahead-of-time compile lowers against."""
        import jax

        shardings = self.shardings(mesh)
        return {
            n: jax.ShapeDtypeStruct(s, np.dtype(self.field(n).dtype), sharding=shardings[n])
            for n, s in self.shapes(dims).items()
        }

    def empty(self, dims: Mapping[str, int]) -> dict[str, np.ndarray]:
        """A batch of padding only (every field at its pad value): rows to fill, or whole padding batches."""
        return {f.name: np.full(tuple(int(dims[d]) for d in f.dims), f.pad, np.dtype(f.dtype)) for f in self.fields}

    def check(self, batch: Mapping) -> None:
        """Asserts dtypes and that dims named alike agree (a contract check for tests and new producers)."""
        seen: dict[str, int] = {}
        for f in self.fields:
            x = np.asarray(batch[f.name])
            assert x.dtype == np.dtype(f.dtype), f"{self.name}.{f.name}: dtype {x.dtype}, expected {f.dtype}"
            assert x.ndim == len(f.dims), f"{self.name}.{f.name}: shape {x.shape}, expected dims {f.dims}"
            for d, n in zip(f.dims, x.shape):
                assert seen.setdefault(d, n) == n, f"{self.name}.{f.name}: dim {d}={n}, elsewhere {seen[d]}"


def round_up(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


MASKED_RANK = 1e9

# The K-wise ranking batch (contract between data/pipeline.py and train/rm_step.py; ARCHITECTURE.md).
KWISE = BatchSpec(
    "kwise",
    (
        Field("tokens", "int32", ("B", "K", "L")),
        Field("positions", "int32", ("B", "K", "L")),
        Field("segment_ids", "int32", ("B", "K", "L")),
        Field("reward_index", "int32", ("B", "K")),
        Field("ranks", "float32", ("B", "K"), pad=MASKED_RANK),
        Field("answer_mask", "bool", ("B", "K"), pad=False),
        Field("answer_lengths", "int32", ("B", "K")),
        Field("row", "int32", ("B",), pad=-1, on_device=False),
    ),
)
KWISE_TRAIN = KWISE.only(
    "tokens", "positions", "segment_ids", "reward_index", "ranks", "answer_mask", name="kwise_train"
)
KWISE_EVAL = KWISE.only(*KWISE_TRAIN.names, "answer_lengths", name="kwise_eval")

# The same rankings in packed / shared-prefix rows (data/layout.py): R rows of L tokens hold the prompts' segments;
# answer (b, k)'s reward is read at row `reward_row[b, k]`, column `reward_index[b, k]`. R is the sharded axis of
# the row fields, B of the per-answer fields (the pipeline keeps both divisible by the data-parallel size).
KWISE_PACKED = BatchSpec(
    "kwise_packed",
    (
        Field("tokens", "int32", ("R", "L")),
        Field("positions", "int32", ("R", "L")),
        Field("segment_ids", "int32", ("R", "L")),
        Field("reward_row", "int32", ("B", "K")),
        Field("reward_index", "int32", ("B", "K")),
        Field("ranks", "float32", ("B", "K"), pad=MASKED_RANK),
        Field("answer_mask", "bool", ("B", "K"), pad=False),
        Field("answer_lengths", "int32", ("B", "K")),
        Field("row", "int32", ("B",), pad=-1, on_device=False),
    ),
)
KWISE_PACKED_TRAIN = KWISE_PACKED.only(
    *KWISE_TRAIN.names[:3], "reward_row", *KWISE_TRAIN.names[3:], name="kwise_packed_train"
)
KWISE_PACKED_EVAL = KWISE_PACKED.only(*KWISE_PACKED_TRAIN.names, "answer_lengths", name="kwise_packed_eval")


def kwise_specs(packed: bool) -> tuple[BatchSpec, BatchSpec]:
    """(train spec, eval spec) of the K-wise batch in per-answer [B, K, L] or packed [R, L] rows."""
    return (KWISE_PACKED_TRAIN, KWISE_PACKED_EVAL) if packed else (KWISE_TRAIN, KWISE_EVAL)


# The supervised (SFT) batch: one rendered conversation per row; `loss_mask` marks the tokens that are predicted
# (the assistant's answer and its end-of-turn), so the prompt carries no loss.
SFT = BatchSpec(
    "sft",
    (
        Field("tokens", "int32", ("B", "L")),
        Field("positions", "int32", ("B", "L")),
        Field("segment_ids", "int32", ("B", "L")),
        Field("loss_mask", "bool", ("B", "L"), pad=False),
        Field("row", "int32", ("B",), pad=-1, on_device=False),
    ),
)
SFT_TRAIN = SFT.only("tokens", "positions", "segment_ids", "loss_mask", name="sft_train")

# RL (rl/job.py): a rollout row is the left-padded prompt (P tokens) then the response (T tokens), S = P + T;
# `mask` marks the response tokens that are trained (up to and including the EOS, or the cut at a stop string).
ROLLOUT = BatchSpec(
    "rollout",
    (
        Field("tokens", "int32", ("B", "S")),
        Field("positions", "int32", ("B", "S")),
        Field("segment_ids", "int32", ("B", "S")),
        Field("mask", "float32", ("B", "T")),
    ),
)
# The experience a rollout makes (rl/experience.py) and each minibatch update reads: per response token the
# sampling policy's and the reference's log-probs, the critic's values, advantages and returns.
EXPERIENCE = BatchSpec(
    "experience",
    (
        *ROLLOUT.only("tokens", "positions", "segment_ids").fields,
        Field("old_logprobs", "float32", ("B", "T")),
        Field("ref_logprobs", "float32", ("B", "T")),
        Field("old_values", "float32", ("B", "T")),
        Field("advantages", "float32", ("B", "T")),
        Field("returns", "float32", ("B", "T")),
        Field("mask", "float32", ("B", "T")),
    ),
)
# What a critic-free update (grpo / rloo) reads: no values, no returns.
EXPERIENCE_NO_CRITIC = EXPERIENCE.only(
    *(n for n in EXPERIENCE.names if n not in ("old_values", "returns")), name="experience_no_critic"
)
