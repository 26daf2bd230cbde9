"""TFDS builder for tokenized Nectar (`nectar_tokenized`): validated, chat-formatted, tokenized once.

`NectarTokenized(input=..., tokenizer_dir=..., template=..., max_length=..., data_dir=OUT)` reads the input
(file or Hub name) once, validates and tokenizes every row, splits by prompt hash into `train`/`eval`, spills
the examples to temporary files and writes them as array_record shards (random access for the pipeline's batch
plan) in file order. The dataset metadata records the tokenizer, template, max_length, pad id and eval fraction.
After `download_and_prepare()`, `builder.report` holds the counts for `report.json`.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from starling_jax.data import tokenizer as tokenizer_lib
from starling_jax.data.nectar import ReadReport, read_rankings, split_of
from starling_jax.data.tokenize import LengthStats, RowDoesNotFit, tokenize_ranking
from starling_jax.errors import DataError

SPLITS = ("train", "eval")


class NoRowsKept(DataError):
    """Every row was skipped; the report is still written."""


class NectarTokenized(tfds.core.GeneratorBasedBuilder):
    """Tokenized Nectar rankings (one example per prompt, answers in the row's original order)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # No checksums / source folder: avoids tfds' code_path lookup (it needs the `importlib_resources` backport).
    code_path = None

    def __init__(
        self,
        *,
        input=None,
        tokenizer=None,
        tokenizer_dir: str = "",
        template: str = "llama2_chat",
        max_length: int = 2048,
        eval_fraction: float = 0.05,
        on_bad_row: str = "error",
        provenance: dict | None = None,
        **kwargs,
    ):
        self._input = input
        self._tokenizer = tokenizer
        self._tokenizer_dir = str(tokenizer_dir)
        self._template = template
        self._max_length = int(max_length)
        self._eval_fraction = float(eval_fraction)
        self._on_bad_row = on_bad_row
        self.provenance = provenance or {}
        self.report = ReadReport()
        self.stats = LengthStats()
        self.rows_truncated = 0  # rows whose prompt or an answer was cut to fit max_length
        self.rows_answer_cut = 0  # of those, rows where an answer lost its beginning (the prompt alone was not enough)
        self.split_counts = {s: 0 for s in SPLITS}
        self._spill = None
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        tok = self._tokenizer
        meta = {
            "input": str(self._input),
            "tokenizer_dir": self._tokenizer_dir,
            "template": self._template,
            "max_length": self._max_length,
            "eval_fraction": self._eval_fraction,
            "pad_id": int(tok.pad_token_id) if tok is not None and tok.pad_token_id is not None else 0,
            "vocab_size": len(tok) if tok is not None else 0,
            "provenance": self.provenance,
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "row": np.int64,
                    "tokens": tfds.features.Sequence(tfds.features.Sequence(np.int32)),
                    "answer_start": tfds.features.Sequence(np.int32),
                    "answer_lengths": tfds.features.Sequence(np.int32),
                    "reward_index": tfds.features.Sequence(np.int32),
                    "ranks": tfds.features.Sequence(np.float32),
                    "models": tfds.features.Sequence(tfds.features.Text()),
                    "sources": tfds.features.Sequence(tfds.features.Text()),
                    "turns": np.int32,
                    "good_natured": np.int8,  # 1 / 0, -1 = unknown
                    "truncated": np.bool_,
                }
            ),
            metadata=tfds.core.MetadataDict(meta),
            disable_shuffling=True,
            homepage="https://huggingface.co/datasets/berkeley-nest/Nectar",
        )

    def _tokenize_all(self) -> dict:
        """One pass over the input: validate, tokenize, spill per split. Returns {split: spill path}."""
        tmp = Path(tempfile.mkdtemp(prefix="nectar_spill."))
        self._spill = tmp
        files = {s: open(tmp / f"{s}.pkl", "wb") for s in SPLITS}
        try:
            for r in read_rankings(self._input, self._on_bad_row, self.report):
                try:
                    t = tokenize_ranking(r, self._tokenizer, self._template, self._max_length)
                except RowDoesNotFit as e:
                    # a row too long for max_length is a bad row like any other: it follows on_bad_row
                    if self._on_bad_row == "error":
                        raise DataError(
                            f"{self._input}: row {r.row}: {e} (--on-bad-row skip drops such rows and reports them)"
                        ) from None
                    self.report.rows_kept -= 1
                    self.report.skip(r.row, str(e))
                    continue
                self.stats.add(t)
                self.rows_truncated += int(t.truncated)
                self.rows_answer_cut += int(bool(t.answer_cut is not None and t.answer_cut.any()))
                s = split_of(r.prompt, self._eval_fraction)
                self.split_counts[s] += 1
                ex = {
                    "row": t.row,
                    "tokens": t.tokens,
                    "answer_start": t.answer_start,
                    "answer_lengths": t.answer_lengths,
                    "reward_index": t.reward_index,
                    "ranks": t.ranks,
                    "models": list(t.models),
                    "sources": list(t.sources),
                    "turns": int(t.turns),
                    "good_natured": -1 if t.good_natured is None else int(t.good_natured),
                    "truncated": t.truncated,
                }
                pickle.dump(ex, files[s], protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            for f in files.values():
                f.close()
        return {s: tmp / f"{s}.pkl" for s in SPLITS}

    def _split_generators(self, dl_manager):
        paths = self._tokenize_all()
        if not any(self.split_counts.values()):
            raise NoRowsKept(
                f"{self._input}: no rows left after validation and truncation "
                f"({self.report.rows_skipped} skipped, see report.json)"
            )
        # TFDS cannot write an empty split (e.g. eval with --eval-fraction 0): such a split is left out
        return {s: self._generate_examples(paths[s]) for s in SPLITS if self.split_counts[s]}

    def _generate_examples(self, path):
        with open(path, "rb") as f:
            while True:
                try:
                    ex = pickle.load(f)
                except EOFError:
                    break
                yield int(ex["row"]), ex

    def cleanup(self):
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None


def prepare(
    input,
    output_dir,
    tokenizer,
    tokenizer_dir: str,
    template: str,
    max_length: int,
    eval_fraction: float,
    on_bad_row: str,
) -> NectarTokenized:
    """Build the TFDS dataset under `output_dir` and return the builder (with `.report`, `.stats`)."""
    tfds.disable_progress_bar()
    b = make_builder(input, output_dir, tokenizer, tokenizer_dir, template, max_length, eval_fraction, on_bad_row)
    try:
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    finally:
        b.cleanup()
        shutil.rmtree(Path(output_dir) / "downloads", ignore_errors=True)
    return b


def make_builder(
    input,
    output_dir,
    tokenizer,
    tokenizer_dir: str,
    template: str,
    max_length: int,
    eval_fraction: float,
    on_bad_row: str,
) -> NectarTokenized:
    provenance = tokenizer_lib.data_provenance(tokenizer, tokenizer_dir, template, max_length)
    return NectarTokenized(
        input=input,
        tokenizer=tokenizer,
        tokenizer_dir=tokenizer_dir,
        template=template,
        max_length=max_length,
        eval_fraction=eval_fraction,
        on_bad_row=on_bad_row,
        provenance=provenance,
        data_dir=str(output_dir),
        file_format="array_record",
    )
