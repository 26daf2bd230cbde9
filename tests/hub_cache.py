"""A HuggingFace Hub cache built by hand, so that Hub ids are tested offline (`HF_HUB_OFFLINE=1`).

huggingface_hub's cache layout (`huggingface_hub/file_download.py`): under `$HF_HOME/hub` (= `HF_HUB_CACHE`) a repo
`ORG/NAME` is `models--ORG--NAME/` with `blobs/<hash>` (the files' contents), `snapshots/<commit>/<path>` (symlinks
to the blobs) and `refs/main` (the commit the default branch points to). Offline, `snapshot_download` reads
`refs/main` and returns `snapshots/<commit>`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_to_hub_cache(
    hf_home: str | Path, repo_id: str, files: dict[str, str | Path | bytes], commit: str | None = None
) -> Path:
    """Stores `files` (repo path → local file to copy, or bytes) as `repo_id`'s `main` revision in the cache of
    `HF_HOME=hf_home` → the snapshot folder. The layout is checked with huggingface_hub's own cache lookup."""
    from huggingface_hub import try_to_load_from_cache

    cache = Path(hf_home) / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    first = next(iter(files))
    assert try_to_load_from_cache(repo_id, first, cache_dir=cache) == str(snapshot / first)
    return snapshot


def folder_files(*folders: str | Path, skip: tuple[str, ...] = ()) -> dict[str, Path]:
    """repo path → file for every file of `folders` (later folders win), except the names in `skip`."""
    out: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and rel not in skip:
                out[rel] = path
    return out
