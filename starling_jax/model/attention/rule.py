"""The layout rule every attention implementation computes (ARCHITECTURE.md, "Model calling convention"): query
token i attends to key token j iff

    visible(seg[i], seg[j])  and  j <= i  and  (no window or pos[i] - pos[j] < W)

    visible(a, b) = b != 0 and (a == b or (b % PREFIX_STRIDE == 0 and b // PREFIX_STRIDE == a // PREFIX_STRIDE))

Segment id 0 is padding. Ids 1 .. PREFIX_STRIDE-1 are plain segments (one sequence each: per-answer rows, packed
rows). Ids >= PREFIX_STRIDE encode a *shared-prefix group* g >= 1 as `g·PREFIX_STRIDE + b`: b = 0 marks the prompt
tokens of the group, b = 1..K its answers. An answer sees its group's prompt and itself, never a sibling answer;
a plain segment is never a prefix of anything. The window is measured in positions (an answer's positions
continue from its prompt's end, so position distance, not index distance, is the token distance), causality in
indices (every layout stores a token after everything it may see, which lets the blockwise kernel skip blocks).

The boolean masks of the rule live here too: the reference's [N, 1, 1, L, L] mask, and the [N, 1, 1, Q, L] mask
of a few selected queries (`Decoder(select=...)`).
"""

from __future__ import annotations

import jax.numpy as jnp

from starling_jax.data.layout import PREFIX_BITS, PREFIX_STRIDE  # noqa: F401 (the segment encoding)

# What a batch's rows can hold (`data.attention_layout`); each implementation declares which it attends over.
# left_padded: one segment per row after left padding (RL rollouts: prompt, then completion); fused/cudnn take
# per-row lengths, i.e. rows that start at index 0.
LAYOUTS = ("per_answer", "packed", "shared_prefix", "left_padded")


def visible(q_seg, k_seg):
    """The segment part of the rule, broadcasting q_seg against k_seg (see the module docstring).

    `% PREFIX_STRIDE` and `// PREFIX_STRIDE` as a mask and a shift (ids are >= 0): XLA fuses this into every
    consumer of the [.., q, k] mask and evaluates it per score element; integer division there made the CPU
    blockwise forward ~4x slower (BENCHMARKS.md, "Train step vs PyTorch")."""
    prefix = ((k_seg & (PREFIX_STRIDE - 1)) == 0) & ((k_seg >> PREFIX_BITS) == (q_seg >> PREFIX_BITS))
    return (k_seg != 0) & ((q_seg == k_seg) | prefix)


def allowed(q_seg, k_seg, q_pos, k_pos, q_idx, k_idx, sliding_window: int | None):
    """Boolean [..., q, k] from per-token [..., q] / [..., k] arrays (broadcast)."""
    ok = visible(q_seg[..., :, None], k_seg[..., None, :]) & (k_idx[..., None, :] <= q_idx[..., :, None])
    if sliding_window is not None:
        ok &= (q_pos[..., :, None] - k_pos[..., None, :]) < sliding_window
    return ok


def attention_mask(segment_ids, positions, sliding_window: int | None):
    """Boolean [N, 1, 1, L, L] (query, key) mask of the rule, for the reference (`einsum`)."""
    idx = jnp.arange(segment_ids.shape[-1])
    return allowed(segment_ids, segment_ids, positions, positions, idx, idx, sliding_window)[:, None, None]


def take_rows(x, select):
    """x [N, L, ...] at the tokens select [N, Q] → [N, Q, ...]."""
    index = select.astype(jnp.int32).reshape(*select.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, index, axis=1)


def rows_mask(segment_ids, positions, select, sliding_window: int | None):
    """Boolean [N, 1, 1, Q, L]: the rule for the queries at tokens select [N, Q] (int) against every key."""
    keys = jnp.arange(segment_ids.shape[-1])
    ok = allowed(
        take_rows(segment_ids, select),
        segment_ids,
        take_rows(positions, select),
        positions,
        select.astype(jnp.int32),
        keys,
        sliding_window,
    )
    return ok[:, None, None]
