"""Rollout completions cut at stop strings, as the authors' trlx fork does before training and scoring.

thwu1/trlx `AccelerateRLTrainer.decode` decodes each completion (special tokens dropped) and, for every stop string
in turn, cuts the text at its first occurrence and strips trailing whitespace; `make_experience` then appends the
EOS token to a cut text (`append_eos_token=True`) and RE-TOKENIZES it, so the response PPO/APA trains on is the
answer followed by EOS, never the stop string; the reward function gets the cut text without EOS
(`append_eos_token=False`). `cut_at_stop_strings` does the same on the host between the sampler and the rollout
forward, for the rows whose decoded completion contains a stop string:

  text   = decode(completion, skip_special_tokens)
  for s in stop_strings: if s in text: text = text[:text.find(s)].rstrip()      (trlx's loop, in order)
  tokens = encode(text, no special tokens) + [EOS]                             (cut rows only)

The sampler ends a row on the stop string's token forms (`generate.stop_token_sequences`); the cut works on the
decoded text, so a stop string split across tokens in any way (or inside a token with the answer's last
characters) is found too, and a row that ran to `max_new_tokens` with a stop string in its text is cut as trlx
cuts it. Rows without a stop string keep their sampled tokens exactly (trlx re-tokenizes every row, which only
differs where the sampled tokenization is not the tokenizer's own; it also prepends BOS to the re-tokenized
response, `tokenizer(str_outputs)` — not done here). A cut row counts as ended with EOS (the missing-EOS penalty
and `rollout/eos_fraction`). The cut answer plus EOS never needs more room than the sampled row (it replaces the
stop string's tokens); if a re-tokenization were longer than T, its text is cut to T − 1 tokens before the EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from starling_jax.sample.engine import FINISH_EOS


class Completions(NamedTuple):
    """The completions a rollout trains on and the reward model scores (host numpy, N rows, T = max_new_tokens)."""

    tokens: np.ndarray  # int32 [N, T]: response tokens, pad ids after each row's end
    lengths: np.ndarray  # int32 [N]: response tokens per row (the EOS included)
    ended: np.ndarray  # bool [N]: the response ends with EOS (sampled, or appended after a stop string)
    texts: list[str]  # the answer text per row (the RM's re-rendered assistant turn; no EOS, no stop string)
    cut: np.ndarray  # bool [N]: the row was cut at a stop string


def cut_text(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """trlx `decode`'s trim: each stop string in turn cuts the text at its first occurrence, then `rstrip`."""
    trimmed = False
    for stop in stop_strings:
        index = text.find(stop)
        if index >= 0:
            text, trimmed = text[:index].rstrip(), True
    return text, trimmed


def cut_at_stop_strings(
    tokenizer,
    tokens: np.ndarray,
    lengths: np.ndarray,
    finish_reason: np.ndarray,
    stop_strings: Sequence[str],
    eos_id: int,
    pad_id: int,
) -> Completions:
    """Sampler output (tokens int32 [N, T], lengths [N], finish_reason [N]) → the `Completions` of the module
    docstring's rule."""
    tokens = np.array(tokens, np.int32, copy=True)
    lengths = np.array(lengths, np.int32, copy=True)
    ended = np.asarray(finish_reason) == FINISH_EOS
    cut = np.zeros(len(tokens), bool)
    texts = []
    width = tokens.shape[1]
    for i in range(len(tokens)):
        text, trimmed = cut_text(
            tokenizer.decode(tokens[i, : lengths[i]].tolist(), skip_special_tokens=True), stop_strings
        )
        texts.append(text)
        if not trimmed:
            continue
        answer = list(tokenizer.encode(text, add_special_tokens=False))[: width - 1] + [eos_id]
        tokens[i] = pad_id
        tokens[i, : len(answer)] = answer
        lengths[i], ended[i], cut[i] = len(answer), True, True
    return Completions(tokens, lengths, ended, texts, cut)
