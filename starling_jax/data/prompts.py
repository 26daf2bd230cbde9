"""Prompts to continue (generation, RL rollouts): Nectar rows (an HH `prompt` ending with an open assistant turn)
or JSON lines of `messages` (a role/content list ending with a user turn) → message lists.

A bad row is a one-line `DataError` naming the file, row and field.
"""

from __future__ import annotations

import json
from pathlib import Path

from starling_jax.data.chat import parse_hh
from starling_jax.data.nectar import iter_raw_rows
from starling_jax.errors import DataError

ROLES = ("system", "user", "assistant")


def parse_messages(value, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(
                f"{where}: field 'messages[{i}]' must be {{\"role\": one of {list(ROLES)}, "
                f'"content": string}}, got {json.dumps(m)[:120]}'
            )
    if value[-1]["role"] != "user":
        raise DataError(f"{where}: field 'messages': the last message must be a user turn (got {value[-1]['role']!r})")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def read_prompts(path: str | Path) -> list[list[dict[str, str]]]:
    """Every row of `path` as the conversation to continue, in file order."""
    conversations = []
    for row, raw in iter_raw_rows(path):
        where = f"{path}: row {row}"
        if isinstance(raw, tuple):  # a line that is not JSON: (marker, reason)
            raise DataError(f"{where}: {raw[1]}")
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        if "messages" in raw:
            conversations.append(parse_messages(raw["messages"], where))
        elif "prompt" in raw:
            try:
                conversations.append(parse_hh(raw["prompt"]))
            except ValueError as e:
                raise DataError(f"{where}: field 'prompt': {e}") from None
        else:
            raise DataError(f"{where}: no 'prompt' (Nectar HH format) or 'messages' field")
    if not conversations:
        raise DataError(f"{path}: no rows")
    return conversations
