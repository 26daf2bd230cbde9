"""A reward model scoring conversations as `score` does (`RewardScorer`): the model from an HF folder, Hub id or
checkpoint (`load_reward_model`), the tokenizer and template it was trained with (checked against its recorded
provenance), rewards read at the last token in length-bucketed micro-batches (`score_batches.py`). `score`,
`label --judge rm:DIR` and `evaluate` use it, so their rewards are the same numbers."""

from __future__ import annotations

from pathlib import Path

from starling_jax import hub
from starling_jax.ckpt.manager import load_model
from starling_jax.data import tokenizer as tokenizer_lib
from starling_jax.data.tokenize import tokenize_ranking
from starling_jax.errors import CheckpointError
from starling_jax.eval.score_batches import BucketedScorer
from starling_jax.model import hf_io
from starling_jax.parallel import sharding
from starling_jax.paths import as_path

# Padded lengths are multiples of this (as the train pipeline's `data.pad_to_multiple` default).
PAD_TO_MULTIPLE = 128


def load_reward_model(model: str, mesh):
    """→ (model cfg, graphdef, params, tokenizer dir, default max_length, recorded data provenance, default
    template) from an HF folder or a checkpoint. A checkpoint defaults to the template it was trained with; an
    HF export to its tokenizer's chat_template (which renders exactly the training tokens)."""
    path = as_path(model)  # a local folder or a URL (gs://...)
    if not path.is_dir() or (path / "config.json").is_file():  # an HF folder, URL or Hub id (or a one-line error)
        folder = hub.resolve(model, key="--model")
        cfg, graphdef, params = hf_io.load_hf(folder, "reward", mesh)
        recorded = hf_io.read_hf_config(folder).get("starling_jax_data") or {}
        return cfg, graphdef, params, folder, int(recorded.get("max_length") or 2048), recorded, "tokenizer"
    meta, cfg, graphdef, params = load_model(path, mesh)
    if meta["role"] != "reward":
        raise CheckpointError(f"{model}: a {meta['role']} checkpoint, not a reward model")
    recorded = meta.get("data") or {k: meta[k] for k in ("template", "max_length") if k in meta}
    return (
        cfg,
        graphdef,
        params,
        Path(meta["tokenizer_dir"]),
        int(meta.get("max_length", 2048)),
        recorded,
        meta.get("template", "tokenizer"),
    )


class RewardScorer:
    """A reward model with the scoring `score` does: the tokenizer and template it was trained with (checked against
    its recorded provenance), each answer rendered as the last assistant turn of its conversation, rewards read at
    the last token, length-bucketed micro-batches (`score_batches.py`). `label --judge rm:DIR` uses it too, so its
    ranks order answers exactly as `score`'s rewards do."""

    def __init__(self, model: str, template: str | None = None, max_length: int | None = None, batch_size: int = 32):
        mesh = sharding.make_mesh(sharding.MeshConfig())
        _, graphdef, self.params, tokenizer_dir, default_len, recorded, default_template = load_reward_model(
            model, mesh
        )
        self.tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)
        self.max_length = max_length or default_len
        # the model was trained on data tokenized with `recorded`: the same tokenizer (fingerprint) and, for a
        # named template given here, the same template, or a one-line error naming both
        keys = ["tokenizer_fingerprint"] + (["template"] if template and template != "tokenizer" else [])
        self.template = template or default_template
        current = tokenizer_lib.data_provenance(self.tokenizer, tokenizer_dir, self.template, self.max_length)
        tokenizer_lib.check_provenance(
            recorded,
            current,
            f"reward model {model}",
            "score",
            keys=keys,
            remake=None,
            settings={"template": "--template", "tokenizer": "the model's tokenizer files to"},
        )
        self.scorer = BucketedScorer(
            graphdef,
            mesh,
            rows=batch_size,
            max_length=self.max_length,
            pad_to_multiple=PAD_TO_MULTIPLE,
            pad_id=self.tokenizer.pad_token_id or 0,
        )

    def tokenize(self, ranking):
        """A `Ranking` → its `TokenizedRanking` (answers in row order); raises RowDoesNotFit."""
        return tokenize_ranking(ranking, self.tokenizer, self.template, self.max_length)

    def rewards(self, tokenized) -> list:
        """float64 rewards per tokenized row, in the row's answer order (all rows' answers in one bucketed pass)."""
        import numpy as np

        sequences = [t for tr in tokenized for t in tr.tokens]
        reward_index = [int(i) for tr in tokenized for i in tr.reward_index]
        flat = self.scorer(self.params, sequences, reward_index) if sequences else np.zeros(0, np.float32)
        offsets = np.cumsum([0] + [tr.num_answers for tr in tokenized])
        return [flat[offsets[i] : offsets[i + 1]].astype(np.float64) for i in range(len(tokenized))]
