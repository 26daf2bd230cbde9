"""Host-side driver of the sampler: token-id prompts of any lengths → fixed-shape batches → completions.

Prompts are sorted by length and cut into batches of `batch_size` rows (rounded up to a multiple of the mesh's
data-parallel size; short batches are filled with 1-token dummy rows). A batch is left-padded to a bucket
length: the next power of two ≥ its longest prompt (at least `min_bucket`), so a long job compiles one program
per bucket (a handful), never one per batch. Row ids are the prompts' input indices, so a prompt's completion
is the same whatever else shares its batch (per-row sampling keys, see `engine`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from starling_jax.errors import DataError
from starling_jax.model.config import ModelConfig
from starling_jax.parallel import sharding
from starling_jax.sample.engine import FINISH_REASONS, SamplingConfig, make_sampler


def bucket_length(n: int, minimum: int = 16, maximum: int | None = None) -> int:
    """Next power of two ≥ max(n, minimum), capped at `maximum` (when the cap is below, the cap itself)."""
    length = max(minimum, 1 << max(n - 1, 0).bit_length())
    return min(length, maximum) if maximum is not None else length


@dataclasses.dataclass
class Completion:
    tokens: list[int]  # generated ids, including the EOS / stop tokens that ended the row
    finish_reason: str  # "eos" | "stop" | "length"
    logprobs: list[float]  # raw model (temperature 1) log-prob of each token
    sampling_logprobs: list[float]  # log-prob under the sampling distribution (0 for greedy)


class Sampler:
    """Generation with fixed parameters on a mesh; compiled programs are cached per (settings, bucket)."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: nnx.State,
        model_cfg: ModelConfig,
        mesh: Mesh | None = None,
        batch_size: int = 16,
        min_bucket: int = 16,
    ):
        self.graphdef, self.params, self.model_cfg, self.mesh = graphdef, params, model_cfg, mesh
        dp = sharding.data_parallel_size(mesh) if mesh is not None else 1
        self.batch_size = max(dp, -(-batch_size // dp) * dp)
        self.min_bucket = min_bucket
        self._compiled: dict[SamplingConfig, Callable] = {}
        self.new_tokens = 0
        self.seconds = 0.0

    def _fn(self, cfg: SamplingConfig):
        if cfg not in self._compiled:
            self._compiled[cfg] = make_sampler(self.graphdef, cfg, self.mesh)
        return self._compiled[cfg]

    def check_fits(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, names: Sequence[str] | None = None):
        """Every prompt leaves room for max_new_tokens within the model's max_position_embeddings."""
        limit = self.model_cfg.max_position_embeddings - cfg.max_new_tokens + 1
        for i, prompt in enumerate(prompts):
            where = names[i] if names is not None else f"prompt {i}"
            if len(prompt) == 0:
                raise DataError(f"{where}: empty prompt (no tokens)")
            if len(prompt) > limit:
                raise DataError(
                    f"{where}: prompt of {len(prompt)} tokens leaves no room for max_new_tokens="
                    f"{cfg.max_new_tokens} within max_position_embeddings="
                    f"{self.model_cfg.max_position_embeddings}"
                )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig,
        seed: int = 0,
        row_ids: Sequence[int] | None = None,
        progress=None,
        names: Sequence[str] | None = None,
    ) -> list[Completion]:
        """Completions of `prompts` (lists of token ids), in input order. `progress` (e.g. a tqdm bar) is advanced
        by the number of real rows of each finished batch."""
        self.check_fits(prompts, cfg, names)
        row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        fn = self._fn(cfg)
        key = jax.random.key(seed)
        limit = self.model_cfg.max_position_embeddings - cfg.max_new_tokens + 1
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        b = self.batch_size
        for begin in range(0, len(order), b):
            chunk = order[begin : begin + b]
            length = bucket_length(max(len(prompts[i]) for i in chunk), self.min_bucket, limit)
            tokens = np.full((b, length), cfg.pad_token_id, np.int32)
            lengths = np.ones((b,), np.int32)
            ids = np.zeros((b,), np.int32)
            for r, i in enumerate(chunk):
                tokens[r, length - len(prompts[i]) :] = prompts[i]
                lengths[r] = len(prompts[i])
                ids[r] = row_ids[i]
            start = time.perf_counter()
            out = jax.device_get(fn(self.params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(ids), key))
            self.seconds += time.perf_counter() - start
            for r, i in enumerate(chunk):
                n = int(out.lengths[r])
                results[i] = Completion(
                    [int(t) for t in out.tokens[r, :n]],
                    FINISH_REASONS[int(out.finish_reason[r])],
                    [float(x) for x in out.logprobs[r, :n]],
                    [float(x) for x in out.sampling_logprobs[r, :n]],
                )
                self.new_tokens += n
            if progress is not None:
                progress.update(len(chunk))
        return results  # type: ignore[return-value]
