"""The judge's reply → its ranking: the LAST list of letters in the reply (Nectar's `[['C', 'A', ...]]`; a flat
`['C', 'A', ...]` or `[C, A, ...]` too), which must hold each of the K letters exactly once."""

from __future__ import annotations

import re

from starling_jax.judge.prompt import LETTERS

_NESTED = re.compile(r"\[\s*\[([^\[\]]*)\]\s*\]")
_FLAT = re.compile(r"\[([^\[\]]*)\]")


class ReplyError(ValueError):
    """The reply holds no usable ranking (the reason is the message)."""


def parse_ranking(reply: str | None, k: int) -> list[int]:
    """→ presented positions best-first (0 = letter A), a permutation of 0..k-1; raises ReplyError(reason)."""
    if not reply or not reply.strip():
        raise ReplyError("the reply is empty")
    found = _NESTED.findall(reply) or [m for m in _FLAT.findall(reply) if re.search(r"[A-Za-z]", m)]
    if not found:
        raise ReplyError("no ranking list like [['C', 'A', ...]] in the reply")
    items = [item.strip().strip("'\"` ").strip() for item in found[-1].split(",")]
    items = [item for item in items if item]
    allowed = LETTERS[:k]
    out: list[int] = []
    for item in items:
        if len(item) != 1 or item.upper() not in allowed:
            raise ReplyError(f"{item[:20]!r} in the ranking is not one of the letters {', '.join(allowed)}")
        index = allowed.index(item.upper())
        if index in out:
            raise ReplyError(f"letter {item.upper()!r} appears twice in the ranking")
        out.append(index)
    if len(out) != k:
        missing = [allowed[i] for i in range(k) if i not in out]
        raise ReplyError(f"the ranking has {len(out)} letters, {k} expected (missing {', '.join(missing)})")
    return out
