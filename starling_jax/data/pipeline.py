"""K-wise input pipeline: deterministic batch plan, per-host slices, length buckets, K-wise batches, resume.

Design (exact, cheap resume that is identical across hosts): from `(seed, epoch)` and the example lengths every
host computes the same global *batch plan*: the examples are shuffled, sorted by length inside windows of
`bucket_window` global batches (length bucketing), cut into global batches of `global_batch_size` rows, and the
batch order is shuffled. The final partial global batch is filled with padding rows (`answer_mask` all False),
so every host gets the same number of batches and the union of the real rows is the whole split. Each global
batch is split into `process_count` equal host slices; host `process_index` reads only its slice. All hosts of
one global batch use the same L: the global batch's longest sequence rounded up to `pad_to_multiple` (128).

The position is `(epoch, batch)`; `state()` is a JSON-serializable dict saved with the model checkpoint, and
`restore(state)` restarts exactly at that batch (independent of prefetching, which only runs ahead). A batch is
a pure function of its position (`host_batch(epoch, batch)`: reading, gathering, padding), so the loaders only
decide how it is read ahead, never what it holds: `loader="tf_data"` is a tf.data stream over the positions
(`tf.numpy_function`, `num_parallel` calls, deterministic, `prefetch` batches ahead); `loader="threads"` is the
same read-ahead with a Python thread pool, without importing TensorFlow (~10 s of CPU at each process start here,
paid for nothing on in-memory files); `"auto"` (`resolve_loader`) is tf.data for prepared TFDS datasets, which
import TensorFlow anyway, and threads for files. Either calls `host_batch` from several threads at once: the
per-epoch caches it reads are replaced whole, never mutated. Training iterates forever (each epoch re-planned
with `seed + epoch`); `mode="eval"` is one pass, no shuffle, padded final batch, the examples sorted longest
first (stable): each batch is padded to its own longest sequence, so the sort is the eval's length bucketing (at most
max_length / pad_to_multiple batch shapes, and batches of like lengths). Eval metrics are per-prompt means, so
the order changes nothing but the padding.

Rows with more answers than K keep the K best (stable sort by rank). Answers are stored best-first. Padded
answer slots have `answer_mask` False, `ranks` 1e9 (sorts last; never inf, so no NaN in losses), no tokens.
Besides the ARCHITECTURE.md keys a batch carries `row` int32 [B] (1-based input row, -1 for padding rows).
With `completions=True` (DPO: answer log-probabilities) it also carries `completion_lengths` int32 [B, K]: the
tokens after the prompt (answer text + template suffix), which end at the answer's `reward_index`; a shared prefix
then stops at the answers' first token, so every answer token lies in its answer's own segment.

Layouts (`layout`, `packing`; data/layout.py): `per_answer` without packing gives [B, K, L] arrays; otherwise
the model-facing arrays are packed rows [R, L] (+ `reward_row` [B, K]) of length `max_length` (rounded up to
`pad_to_multiple`), with R fixed for a whole epoch: the most rows any host slice of any batch of the epoch's
plan needs (every host computes the same R from the lengths alone), so shapes stay static.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import json
import math
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from starling_jax.data import layout as layout_lib
from starling_jax.data import tokenizer as tokenizer_lib
from starling_jax.data.batch_spec import KWISE, MASKED_RANK
from starling_jax.data.nectar import ReadReport, empty_split_message, read_rankings, split_of
from starling_jax.data.resumable import ResumableIterator
from starling_jax.data.tokenize import RowDoesNotFit, tokenize_ranking
from starling_jax.errors import DataError
from starling_jax.paths import as_path

BATCH_KEYS = KWISE.names  # the K-wise batch spec (data/batch_spec.py) fixes names, dtypes and pad values


LOADERS = ("auto", "tf_data", "threads")

# Live pipelines: their read-ahead iterators are closed at exit. A tf.data iterator whose map runs Python
# (`tf.numpy_function`) still alive at interpreter shutdown can deadlock the exit (the prefetch threads wait
# for the GIL of a finalizing interpreter), so every pipeline closes its iterator in an atexit hook.
_LIVE: "weakref.WeakSet[RankingPipeline]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for p in list(_LIVE):
        p.close()


def _round_up(x: int, m: int) -> int:
    return int(math.ceil(max(x, 1) / m) * m)


def select_answers(ranks: Sequence[float], k: int) -> list[int]:
    """Indices of the K best answers, best-first (stable sort by rank: ties keep file order)."""
    return sorted(range(len(ranks)), key=lambda i: float(ranks[i]))[:k]


# ------------------------------------------------------------------------------------------------ sources


class InMemorySource:
    """Random-access examples from `TokenizedRanking`s (small runs straight from a file)."""

    def __init__(
        self,
        tokenized,
        report=None,
        provenance: dict | None = None,
        name: str = "",
        split: str = "train",
        eval_fraction: float = 0.0,
    ):
        self.report = report  # nectar.ReadReport of the pass that read the rows (skipped rows, counts), if any
        self.name, self.split, self.eval_fraction = name, split, eval_fraction  # for errors: which file and split
        self.provenance = provenance or {}  # tokenizer.data_provenance of the tokenization
        self._ex = [
            {
                "row": t.row,
                "tokens": list(t.tokens),
                "ranks": np.asarray(t.ranks, np.float32),
                "answer_lengths": np.asarray(t.answer_lengths, np.int32),
                "answer_start": np.asarray(t.answer_start, np.int32),
                "reward_index": np.asarray(t.reward_index, np.int32),
            }
            for t in tokenized
        ]

    def __len__(self):
        return len(self._ex)

    def __getitem__(self, i):
        return self._ex[i]


class TfdsSource:
    """Random-access examples of a prepared TFDS dataset (array_record files) — see `tfds_nectar`."""

    def __init__(self, builder_dir, split: str):
        import tensorflow_datasets as tfds

        self.name, self.split, self.eval_fraction = str(builder_dir), split, 0.0  # for errors
        self.builder = tfds.builder_from_directory(str(builder_dir))
        if split not in self.builder.info.splits:
            raise DataError(f"{builder_dir}: no split {split!r} (has {list(self.builder.info.splits)})")
        self._src = self.builder.as_data_source(split=split)
        self.metadata = dict(self.builder.info.metadata or {})
        # what prepare_data tokenized with (tokenizer.data_provenance); older datasets: template and max_length
        self.provenance = dict(
            self.metadata.get("provenance")
            or {k: self.metadata[k] for k in ("template", "max_length") if k in self.metadata}
        )
        self.report = prepared_report(builder_dir)  # its skipped rows count in train_rm's rows_skipped

    def __len__(self):
        return len(self._src)

    def __getitem__(self, i):
        return self._src[int(i)]

    def getitems(self, idx):
        if hasattr(self._src, "__getitems__"):
            return self._src.__getitems__([int(i) for i in idx])
        return [self._src[int(i)] for i in idx]


def prepared_report(builder_dir) -> ReadReport | None:
    """The rows `prepare_data` skipped (from its `report.json`, two folders above the TFDS builder folder)."""
    path = as_path(builder_dir).parent.parent / "report.json"
    if not path.is_file():
        return None
    try:
        rep = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    report = ReadReport(
        source=str(rep.get("input", path)),
        rows_read=int(rep.get("rows_read", 0)),
        rows_kept=int(rep.get("rows_kept", 0)),
    )
    for s in rep.get("skipped") or []:
        report.skip(s["row"], s["reason"])
    return report


def _getitems(source, idx):
    if hasattr(source, "getitems"):
        return source.getitems(idx)
    return [source[int(i)] for i in idx]


# ------------------------------------------------------------------------------------------------ plan


def batch_plan(
    lengths: np.ndarray,
    global_batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    bucket_window: int = 32,
    longest_first: bool = False,
) -> np.ndarray:
    """int64 [num_batches, global_batch_size] example indices (-1 = padding row); same on every host.
    Without `shuffle`: file order, or with `longest_first` the examples sorted by length, longest first (ties in
    file order)."""
    n = len(lengths)
    g = global_batch_size
    if shuffle:
        rng = np.random.default_rng([int(seed), int(epoch)])
        order = rng.permutation(n)
        if bucket_window > 1:
            w = g * bucket_window
            chunks = [order[s : s + w] for s in range(0, n, w)]
            order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in chunks]) if chunks else order
    elif longest_first:
        order = np.argsort(-np.asarray(lengths, np.int64), kind="stable")
    else:
        order = np.arange(n)
    nb = max(1, -(-n // g)) if n else 0
    flat = np.full(nb * g, -1, np.int64)
    flat[:n] = order
    plan = flat.reshape(nb, g)
    if shuffle and nb > 1:
        plan = plan[rng.permutation(nb)]
    return plan


# ------------------------------------------------------------------------------------------------ pipeline


class RankingPipeline(ResumableIterator):
    """Per-host K-wise batches (numpy dicts, see ARCHITECTURE.md) with an exact, JSON-serializable position
    (`resumable.ResumableIterator`)."""

    def __init__(
        self,
        source,
        *,
        global_batch_size: int,
        num_answers: int = 7,
        max_length: int | None = None,
        pad_to_multiple: int = 128,
        seed: int = 0,
        mode: str = "train",
        bucket_window: int = 32,
        process_index: int | None = None,
        process_count: int | None = None,
        pad_id: int = 0,
        prefetch: int = 2,
        num_parallel: int = 2,
        layout: str = "per_answer",
        packing: bool = False,
        micro_batches: int = 1,
        row_multiple: int = 1,
        completions: bool = False,
        loader: str = "auto",
    ):
        if mode not in ("train", "eval"):
            raise DataError(f"pipeline mode must be 'train' or 'eval', got {mode!r}")
        self.loader = resolve_loader(loader, source)
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size % process_count:
            raise DataError(f"global_batch_size {global_batch_size} is not divisible by {process_count} processes")
        self.source = source
        self.global_batch_size = int(global_batch_size)
        self.per_host_batch = self.global_batch_size // process_count
        self.num_answers = int(num_answers)
        self.pad_to_multiple = int(pad_to_multiple)
        self.max_l = _round_up(max_length, pad_to_multiple) if max_length else None
        self.seed = int(seed)
        self.mode = mode
        self.bucket_window = int(bucket_window)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.pad_id = int(pad_id)
        self.prefetch = prefetch
        self.num_parallel = num_parallel
        if layout not in layout_lib.LAYOUTS:
            raise DataError(f"data.layout={layout!r}: choose one of {list(layout_lib.LAYOUTS)}")
        self.layout, self.packing, self.micro_batches = layout, bool(packing), int(micro_batches)
        # packed rows per host come in multiples of micro_batches × row_multiple, so that every micro-batch's
        # global rows split evenly over the data-parallel devices (`parallel.sharding.packed_row_multiple`)
        self.row_multiple = int(row_multiple)
        self.packed = layout != "per_answer" or self.packing
        self.completions = bool(completions)
        if self.packed and self.per_host_batch % self.micro_batches:
            raise DataError(
                f"{self.per_host_batch} prompts per host are not divisible by {micro_batches} micro-batches"
            )
        self._rows: tuple[int, int] | None = None  # (epoch, packed rows per host)
        if len(source) == 0:
            # a whole file read for this pipeline (data.eval=FILE) is its `mode` split; a held-out part, its own
            fraction, prepared = getattr(source, "eval_fraction", 0.0), isinstance(source, TfdsSource)
            split = getattr(source, "split", mode) if fraction or prepared else mode
            raise DataError(
                empty_split_message(
                    getattr(source, "name", "") or "the dataset",
                    split,
                    getattr(source, "report", None),
                    fraction,
                    prepared=prepared,
                )
            )
        self._shape: list = []  # per example: (selected sequence lengths, shared prefix length)
        self.lengths = self._scan_lengths()
        if self.packed:
            self.row_length = self.max_l or _round_up(int(self.lengths.max()), pad_to_multiple)
        self.epoch = 0
        self.batch = 0
        self._plan: tuple[int, np.ndarray] | None = None  # (epoch, its batch plan)
        self._it = None
        _LIVE.add(self)

    def close(self) -> None:
        """Stop the read-ahead (tf.data iterator or thread pool); iteration can resume afterwards from `state()`."""
        it, self._it = self._it, None
        if isinstance(it, _ThreadReadAhead):
            it.close()
        elif it is not None:
            alive = weakref.ref(it)
            del it  # normally the last reference: the iterator and its threads go now
            if alive() is not None:  # held by a reference cycle: only a full collection frees it (~2 s in a
                import gc  # process holding JAX, TF and transformers, so not by default)

                gc.collect()

    # -- lengths / plan
    def _scan_lengths(self) -> np.ndarray:
        n = len(self.source)
        out = np.zeros(n, np.int32)
        for s in range(0, n, 1024):
            for i, ex in enumerate(_getitems(self.source, range(s, min(n, s + 1024)))):
                sel = select_answers(ex["ranks"], self.num_answers)
                out[s + i] = max(len(ex["tokens"][j]) for j in sel)
                if self.packed:
                    seqs = [np.asarray(ex["tokens"][j]) for j in sel]
                    prefix = layout_lib.shared_prefix_length(seqs) if self.layout == "shared_prefix" else 0
                    if self.completions:
                        prefix = min(prefix, min(int(ex["answer_start"][j]) for j in sel))
                    self._shape.append(([len(q) for q in seqs], prefix))
        return out

    @property
    def num_examples(self) -> int:
        return len(self.lengths)

    @property
    def num_batches_per_epoch(self) -> int:
        return -(-self.num_examples // self.global_batch_size)

    def plan(self, epoch: int) -> np.ndarray:
        cached = self._plan  # one read: another read-ahead thread may replace it meanwhile
        if cached is None or cached[0] != epoch:
            cached = (
                epoch,
                batch_plan(
                    self.lengths,
                    self.global_batch_size,
                    seed=self.seed + 0,
                    epoch=epoch,
                    shuffle=self.mode == "train",
                    bucket_window=self.bucket_window,
                    longest_first=self.mode == "eval",
                ),
            )
            self._plan = cached
        return cached[1]

    def rows_per_host(self, epoch: int) -> int:
        """Packed rows per host for every batch of this epoch (static shapes; see the module doc)."""
        cached = self._rows
        if cached is None or cached[0] != epoch:
            need = self.micro_batches
            for g in self.plan(epoch):
                for h in range(self.process_count):
                    mine = g[h * self.per_host_batch : (h + 1) * self.per_host_batch]
                    units = [
                        u
                        for b, i in enumerate(mine)
                        if i >= 0
                        for u in layout_lib.units_from_lengths(b, *self._shape[i], self.row_length)
                    ]
                    need = max(need, layout_lib.rows_needed(units, self.row_length, self.micro_batches, self.packing))
            cached = self._rows = epoch, _round_up(need, self.micro_batches * self.row_multiple)
        return cached[1]

    # -- state: `ResumableIterator`'s; a restored position restarts the read-ahead there
    def on_restore(self) -> None:
        self.close()

    # -- batches
    def host_batch(self, epoch: int, batch: int) -> dict:
        """The numpy batch of this host at position (epoch, batch)."""
        g = self.plan(epoch)[batch]
        real = g[g >= 0]
        longest = int(self.lengths[real].max()) if real.size else 1
        length = _round_up(longest, self.pad_to_multiple)
        if self.max_l:
            length = min(length, self.max_l)
        mine = g[self.process_index * self.per_host_batch : (self.process_index + 1) * self.per_host_batch]
        if self.packed:
            return self.make_packed_batch(mine, self.rows_per_host(epoch))
        return self.make_batch(mine, length)

    def make_packed_batch(self, indices: np.ndarray, rows: int) -> dict:
        """The packed / shared-prefix batch of these examples in `rows` rows of `row_length` (data/layout.py)."""
        b, k = len(indices), self.num_answers
        ranks = np.full((b, k), MASKED_RANK, np.float32)
        answer_mask = np.zeros((b, k), bool)
        answer_lengths = np.zeros((b, k), np.int32)
        completion_lengths = np.zeros((b, k), np.int32)
        max_prefix = np.zeros((b,), np.int64)
        row = np.full((b,), -1, np.int32)
        seqs: list[list[np.ndarray]] = [[] for _ in range(b)]
        real = [i for i in range(b) if indices[i] >= 0]
        for i, ex in zip(real, _getitems(self.source, [indices[i] for i in real])):
            row[i] = int(ex["row"])
            sel = select_answers(ex["ranks"], k)
            for slot, j in enumerate(sel):
                seqs[i].append(np.asarray(ex["tokens"][j], np.int32))
                ranks[i, slot] = float(ex["ranks"][j])
                answer_mask[i, slot] = True
                answer_lengths[i, slot] = int(ex["answer_lengths"][j])
                if self.completions:
                    completion_lengths[i, slot] = len(ex["tokens"][j]) - int(ex["answer_start"][j])
            if self.completions:
                max_prefix[i] = min(int(ex["answer_start"][j]) for j in sel)
        offset = self.process_index * rows // self.micro_batches  # this host's rows inside each micro-batch
        packed = layout_lib.pack(
            seqs,
            k,
            self.row_length,
            rows,
            self.layout,
            self.packing,
            self.micro_batches,
            offset,
            self.pad_id,
            max_prefix if self.completions else None,
        )
        packed.pop("real_tokens")
        out = {**packed, "ranks": ranks, "answer_mask": answer_mask, "answer_lengths": answer_lengths, "row": row}
        if self.completions:
            out["completion_lengths"] = completion_lengths
        return out

    @property
    def batch_keys(self) -> tuple:
        return (
            BATCH_KEYS
            + (("reward_row",) if self.packed else ())
            + (("completion_lengths",) if self.completions else ())
        )

    def make_batch(self, indices: np.ndarray, length: int) -> dict:
        b, k = len(indices), self.num_answers
        tokens = np.full((b, k, length), self.pad_id, np.int32)
        positions = np.zeros((b, k, length), np.int32)
        segment_ids = np.zeros((b, k, length), np.int32)
        reward_index = np.zeros((b, k), np.int32)
        ranks = np.full((b, k), MASKED_RANK, np.float32)
        answer_mask = np.zeros((b, k), bool)
        answer_lengths = np.zeros((b, k), np.int32)
        completion_lengths = np.zeros((b, k), np.int32)
        row = np.full((b,), -1, np.int32)
        real = [i for i in range(b) if indices[i] >= 0]
        exs = _getitems(self.source, [indices[i] for i in real])
        for i, ex in zip(real, exs):
            row[i] = int(ex["row"])
            for slot, j in enumerate(select_answers(ex["ranks"], k)):
                t = np.asarray(ex["tokens"][j], np.int32)
                n = len(t)
                if n > length:
                    raise DataError(f"row {row[i]}: answer {j} has {n} tokens > batch length {length}")
                tokens[i, slot, :n] = t
                positions[i, slot, :n] = np.arange(n, dtype=np.int32)
                segment_ids[i, slot, :n] = 1
                reward_index[i, slot] = n - 1
                ranks[i, slot] = float(ex["ranks"][j])
                answer_mask[i, slot] = True
                answer_lengths[i, slot] = int(ex["answer_lengths"][j])
                if self.completions:
                    completion_lengths[i, slot] = n - int(ex["answer_start"][j])
        out = {
            "tokens": tokens,
            "positions": positions,
            "segment_ids": segment_ids,
            "reward_index": reward_index,
            "ranks": ranks,
            "answer_mask": answer_mask,
            "answer_lengths": answer_lengths,
            "row": row,
        }
        if self.completions:
            out["completion_lengths"] = completion_lengths
        return out

    def _load_step(self, step):
        step = int(step)
        nb = self.num_batches_per_epoch
        out = self.host_batch(step // nb, step % nb)
        return tuple(out[k] for k in self.batch_keys)

    def _tf_iterator(self):
        import tensorflow as tf

        nb = self.num_batches_per_epoch
        start = self.epoch * nb + self.batch
        if self.mode == "eval":
            ds = tf.data.Dataset.range(start, nb)
        else:
            ds = tf.data.Dataset.counter(start)
        touts = [tf.int32, tf.int32, tf.int32, tf.int32, tf.float32, tf.bool, tf.int32, tf.int32]
        touts += [tf.int32] * (len(self.batch_keys) - len(BATCH_KEYS))

        def load(step):
            return tf.numpy_function(self._load_step, [step], touts, stateful=False)

        ds = ds.map(load, num_parallel_calls=self.num_parallel, deterministic=True)
        ds = ds.prefetch(self.prefetch)
        return ds.as_numpy_iterator()

    def _positions(self):
        """The positions from the current one on, in order: one pass for eval, forever for train."""
        nb = self.num_batches_per_epoch
        step = self.epoch * nb + self.batch
        while self.mode == "train" or step < nb:
            yield step
            step += 1

    def fetch(self, epoch: int, batch: int) -> dict:
        # the read-ahead starts at the current position and serves the positions in order
        if self._it is None:
            if self.loader == "tf_data":
                self._it = self._tf_iterator()
            else:
                self._it = _ThreadReadAhead(self._load_step, self._positions(), self.num_parallel, self.prefetch)
        return dict(zip(self.batch_keys, next(self._it)))


def resolve_loader(loader: str, source) -> str:
    """`auto` → `tf_data` for a prepared TFDS dataset (TensorFlow is loaded for it anyway), `threads` otherwise."""
    if loader not in LOADERS:
        raise DataError(f"data.loader={loader!r}: choose one of {list(LOADERS)}")
    if loader == "auto":
        return "tf_data" if isinstance(source, TfdsSource) else "threads"
    return loader


class _ThreadReadAhead:
    """`load(position)` for each of `positions`, in order, computed by `workers` threads up to `ahead` positions
    beyond the one served (tf.data's `map(num_parallel_calls, deterministic=True).prefetch(ahead)` without
    TensorFlow). An exception in `load` is raised when its position is served, as tf.data does."""

    def __init__(self, load, positions, workers: int, ahead: int):
        self._load, self._positions = load, positions
        self._pool = concurrent.futures.ThreadPoolExecutor(max(int(workers), 1), thread_name_prefix="read_ahead")
        self._pending = collections.deque()
        self._depth = max(int(workers), 1) + max(int(ahead), 0)

    def __iter__(self):
        return self

    def __next__(self):
        while len(self._pending) < self._depth:
            position = next(self._positions, None)
            if position is None:
                break
            self._pending.append(self._pool.submit(self._load, position))
        if not self._pending:
            raise StopIteration
        return self._pending.popleft().result()

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------ global


def to_global(batch: dict, mesh, data_sharding=None) -> dict:
    """Host-local numpy batch → global `jax.Array`s (`jax.make_array_from_process_local_data`).

    `data_sharding`: a `jax.sharding.Sharding`, a `PartitionSpec` (applied on `mesh`), or None = the batch
    axis sharded over every mesh axis named data/fsdp (or the first axis).
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if data_sharding is None:
        axes = tuple(a for a in mesh.axis_names if a in ("data", "fsdp", "dcn")) or (mesh.axis_names[0],)
        data_sharding = PartitionSpec(axes)
    if isinstance(data_sharding, PartitionSpec):
        data_sharding = NamedSharding(mesh, data_sharding)
    return {k: jax.make_array_from_process_local_data(data_sharding, np.asarray(v)) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------ factories


def find_prepared(path) -> Path | None:
    """The TFDS builder folder inside a `prepare_data` output folder (or the folder itself), else None."""
    p = as_path(path)
    if (p / "dataset_info.json").is_file():
        return p
    hits = sorted(p.glob("nectar_tokenized/*/dataset_info.json")) if p.is_dir() else []
    return hits[-1].parent if hits else None


def open_source(
    path,
    split: str = "train",
    *,
    tokenizer=None,
    template: str = "llama2_chat",
    max_length: int | None = None,
    eval_fraction: float = 0.0,
    on_bad_row: str = "error",
    tokenizer_name: str | None = None,
):
    """A prepared `prepare_data` folder → TfdsSource; a Nectar-schema file → tokenized InMemorySource.

    A prepared dataset must have been made with this tokenizer (same fingerprint), template and max_length:
    otherwise a one-line DataError names both sides (`tokenizer.check_provenance`; `max_length=None` accepts the
    prepared one, and tokenizes a file with 2048)."""
    if tokenizer is None:
        tokenizer_name = str(tokenizer_lib.default_tokenizer_for(template))
        tokenizer = tokenizer_lib.load_tokenizer(tokenizer_name)
    check_length, max_length = max_length is not None, max_length or 2048
    current = tokenizer_lib.data_provenance(
        tokenizer, tokenizer_name or getattr(tokenizer, "name_or_path", "?"), template, max_length
    )
    prepared = find_prepared(path)
    if prepared is not None:
        src = TfdsSource(prepared, split)
        tokenizer_lib.check_provenance(
            src.provenance,
            current if check_length else {**current, "max_length": None},
            f"prepared dataset {prepared}",
            "this run",
            settings={k: f"data.{k}" for k in ("max_length", "template", "tokenizer")},
        )
        return src
    if as_path(path).is_dir():
        raise DataError(f"{path}: folder holds no prepared dataset (run starling_jax.prepare_data)")
    report = ReadReport()
    out = []
    for r in read_rankings(path, on_bad_row, report):
        if eval_fraction and split_of(r.prompt, eval_fraction) != split:
            continue
        if not eval_fraction and split != "train":
            continue
        try:
            out.append(tokenize_ranking(r, tokenizer, template, max_length))
        except RowDoesNotFit as e:
            # a row too long for max_length is a bad row like any other: it follows the same policy
            if on_bad_row == "error":
                raise DataError(f"{path}: row {r.row}: {e} (on_bad_row=skip drops such rows and reports them)")
            report.rows_kept -= 1
            report.skip(r.row, str(e))
    return InMemorySource(out, report, current, name=str(path), split=split, eval_fraction=eval_fraction)
