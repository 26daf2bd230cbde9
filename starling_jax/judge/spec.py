"""`--judge SPEC`: which judge ranks the answers (`label`, `evaluate policy`)."""

from __future__ import annotations

from starling_jax.errors import ConfigError

JUDGE_KINDS = ("openai", "rm")


def parse_judge(spec: str) -> tuple[str, str]:
    kind, sep, name = spec.partition(":")
    if not sep or kind not in JUDGE_KINDS or not name:
        raise ConfigError(f"--judge {spec!r}: expected openai:MODEL or rm:DIR")
    return kind, name
