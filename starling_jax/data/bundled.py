"""The synthetic Nectar file shipped with the package (`data/synthetic.py` writes it), and the alias configs and
entry points accept for it. No numpy here: entry points import it at start-up, and `--help` stays instant."""

from __future__ import annotations

from pathlib import Path

BUNDLED = "nectar_synthetic.jsonl"
BUNDLED_ALIAS = "bundled"  # what configs and entry points accept for the bundled file (the embedded default's data)


def bundled_path() -> Path:
    """Path of the bundled synthetic file (3000 rows)."""
    return Path(__file__).resolve().parent.parent / "resources" / BUNDLED


def resolve_bundled(path: str) -> str:
    """BUNDLED_ALIAS → the bundled file's path; anything else unchanged."""
    return str(bundled_path()) if path == BUNDLED_ALIAS else path
