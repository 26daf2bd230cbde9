"""Reward-model inputs from policy rollouts: re-rendered text, or the rollout's own tokens.

Two paths, chosen once per run (`rl.reward_model_shares_tokenizer`):

* Different tokenizer or chat format (Starling-LM-7B-alpha: an OpenChat-3.5 policy scored by a Llama-2-chat RM):
  each completion is decoded to text (special tokens dropped) and the conversation (prompt messages + completion
  as the assistant turn) is rendered with the RM's template and tokenized by the RM's tokenizer through
  `data.tokenize.tokenize_answers` — the exact code `score` and `train_rm` use, with the same truncation rules —
  so the reward is read at the RM's own final token (Llama-2-chat: the closing `</s>`).
* Same tokenizer and template: no decode / re-encode. The RM reads prompt tokens + generated tokens as they are,
  at the last generated token (the end-of-turn EOS when the row finished; the last budgeted token when it was
  cut by `max_new_tokens`).

Either way the completions are those of `rl/stops.py`: a row with a stop string gives its answer text (first path)
or its answer tokens + the appended EOS (second path), never the stop string.

Both return the RM batch of ARCHITECTURE.md's calling convention, right-padded: tokens, positions, segment_ids
int32 [N, L] and reward_index int32 [N]; L is a multiple of `pad_multiple` so that a run compiles a few shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from starling_jax.data.chat import Message
from starling_jax.data.tokenize import tokenize_answers
from starling_jax.errors import ConfigError


def pack_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int, pad_multiple: int = 128, num_rows: int | None = None
) -> dict[str, np.ndarray]:
    """Right-padded batch of the given token sequences; reward_index = len − 1. Rows beyond the sequences (up to
    `num_rows`) are padding (segment 0, reward_index 0) whose score is never read."""
    n = len(sequences) if num_rows is None else num_rows
    if n < len(sequences):
        raise ValueError(f"num_rows={num_rows} < {len(sequences)} sequences")
    longest = max((len(s) for s in sequences), default=1)
    length = -(-longest // pad_multiple) * pad_multiple
    tokens = np.full((n, length), pad_id, np.int32)
    positions = np.zeros((n, length), np.int32)
    segment_ids = np.zeros((n, length), np.int32)
    reward_index = np.zeros((n,), np.int32)
    for r, seq in enumerate(sequences):
        tokens[r, : len(seq)] = seq
        positions[r, : len(seq)] = np.arange(len(seq))
        segment_ids[r, : len(seq)] = 1
        reward_index[r] = len(seq) - 1
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "reward_index": reward_index}


def rm_batch_from_text(
    tokenizer,
    template: str,
    conversations: Sequence[Sequence[Message]],
    completions: Sequence[str],
    max_length: int,
    pad_multiple: int = 128,
    num_rows: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Renders each conversation + completion with the RM's `template` and `tokenizer` → (RM batch, truncated
    bool [N]). Raises `RowDoesNotFit` (a `DataError`) if a completion cannot keep one token in `max_length`."""
    sequences, truncated = [], []
    for messages, completion in zip(conversations, completions, strict=True):
        (answer,) = tokenize_answers(tokenizer, messages, [completion], template, max_length)
        sequences.append(answer.tokens)
        truncated.append(answer.truncated)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pack_sequences(sequences, pad_id, pad_multiple, num_rows), np.asarray(truncated, bool)


def rm_batch_from_tokens(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    pad_multiple: int = 128,
    num_rows: int | None = None,
) -> dict[str, np.ndarray]:
    """prompt tokens + generated tokens per row, unchanged (the shared-tokenizer path)."""
    return pack_sequences(
        [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)], pad_id, pad_multiple, num_rows
    )


def check_shared_tokenizer(policy_tokenizer, rm_tokenizer, policy_dir: str | Path, rm_dir: str | Path) -> None:
    """A run that declares the policy and RM share a tokenizer must have the same vocabulary and chat template;
    otherwise reading policy tokens with the RM would silently score garbage."""
    if policy_tokenizer.get_vocab() != rm_tokenizer.get_vocab():
        raise ConfigError(
            f"rl.reward_model_shares_tokenizer=true but the tokenizers of {policy_dir} and {rm_dir} "
            "have different vocabularies; set it to false to re-render completions as text"
        )
    if (policy_tokenizer.chat_template or "") != (rm_tokenizer.chat_template or ""):
        raise ConfigError(
            f"rl.reward_model_shares_tokenizer=true but {policy_dir} and {rm_dir} use different "
            "chat templates; set it to false to re-render completions in the RM's format"
        )
