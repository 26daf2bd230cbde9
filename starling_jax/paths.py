"""Local paths and Cloud Storage URLs (`gs://bucket/...`) behind one interface.

Every place that reads or writes a run's files (`output_dir`, `data.train`, `init_from`, checkpoints, HF exports,
`--checkpoint`/`--model`) takes its path through `as_path`: a local path stays a `pathlib.Path`; a URL becomes an
`etils.epath.Path`, whose file operations go to `tf.io.gfile` when TensorFlow is installed (as it is here) or to
fsspec (gcsfs) with `EPATH_USE_TF=false`. Orbax writes a checkpoint's arrays to the same URL through TensorStore's
`gcs` driver and its metadata through epath. Both kinds of path have the same methods (`/`, `name`, `parent`,
`exists`, `is_dir`, `is_file`, `iterdir`, `glob`, `mkdir`, `open`, `read_text`, `write_text`), so the code
after `as_path` is the same for both.

Libraries that only take local files (transformers, safetensors, tokenizers, tensorboardX) work on a local copy:
`local_copy` downloads a remote folder into the cache (`$STARLING_JAX_CACHE/remote/...`, default
`~/.cache/starling_jax`), and `upload_folder` copies a finished local folder to a URL.

Every writer of an output folder (HF exports: `save_hf`, `export_hf`, the trainers' in-run exports,
`convert_starling`) checks it with `check_output_folder` and writes it through `atomic_folder`: aside, then renamed
into place (locally) or uploaded when complete (a URL), so a reader never sees a half-written folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

from etils import epath

from starling_jax.errors import CheckpointError

AnyPath = Union[Path, epath.Path]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CHUNK = 64 << 20  # bytes per read when streaming a file between a URL and a local disk


def is_url(path) -> bool:
    """True for `scheme://...` (gs://, s3://, ...), False for a local path."""
    return path is not None and bool(_URL.match(os.fspath(path)))


def as_path(path, absolute: bool = False) -> AnyPath:
    """`pathlib.Path` for a local path (made absolute with `absolute=True`), `epath.Path` for a URL."""
    if is_url(path):
        return epath.Path(os.fspath(path))
    p = Path(path)
    return p.absolute() if absolute else p


def cache_dir() -> Path:
    env = os.environ.get("STARLING_JAX_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "starling_jax") / "remote"


def copy_file(src: AnyPath, dst: AnyPath) -> None:
    """Streams one file from `src` to `dst` (either side local or a URL)."""
    with src.open("rb") as fsrc, dst.open("wb") as fdst:
        shutil.copyfileobj(fsrc, fdst, _CHUNK)


def append_text(path: AnyPath, text: str) -> None:
    """Appends `text` to the file at `path`. A local file is opened in append mode; a Cloud Storage object cannot
    be appended to, so a URL's object is read and written again whole (for small files such as samples.jsonl)."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not is_url(path):
        with path.open("a", encoding="utf-8") as f:
            f.write(text)
        return
    before = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(before + text, encoding="utf-8")


def _files(folder: AnyPath, prefix: str = "") -> list[tuple[str, AnyPath]]:
    """(relative name, path) of every file under `folder`, sorted."""
    out = []
    for child in sorted(folder.iterdir(), key=lambda p: p.name):
        rel = f"{prefix}{child.name}"
        if child.is_dir():
            out += _files(child, rel + "/")
        else:
            out.append((rel, child))
    return out


def local_copy(url) -> Path:
    """A local copy of the folder at `url`, kept in the cache and refreshed file by file (a file is downloaded
    again when its size differs). Each file is written aside and renamed, so processes sharing the cache never
    read half a file. A local path is returned as it is."""
    if not is_url(url):
        return Path(url)
    src = as_path(url)
    if not src.is_dir():
        raise FileNotFoundError(f"{url}: no such folder")
    scheme, rest = os.fspath(url).split("://", 1)
    dst = cache_dir() / scheme / rest.strip("/")
    for rel, remote in _files(src):
        local = dst / rel
        if local.is_file() and local.stat().st_size == remote.stat().length:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", dir=local.parent)
        os.close(fd)
        try:
            copy_file(remote, Path(tmp))
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dst


def upload_folder(local: Path, url: AnyPath, replace: bool = True) -> None:
    """Copies the local folder `local` to `url` (a URL folder). With `replace` whatever was at `url` is deleted
    first. `config.json` is copied last: a reader that waits for it sees a complete HF folder (Cloud Storage has
    no atomic folder rename)."""
    url = as_path(url)
    if replace and url.exists():
        url.rmtree()
    url.mkdir(parents=True, exist_ok=True)
    files = _files(local)
    files.sort(key=lambda f: f[0] == "config.json")
    for rel, path in files:
        target = url / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_file(path, target)


def check_output_folder(folder, overwrite: bool) -> None:
    """An existing non-empty output folder is refused unless `overwrite` (CheckpointError)."""
    folder = as_path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise CheckpointError(f"{folder}: output folder exists and is not empty; pass --overwrite to replace it")


def _default_permissions(root: Path) -> None:
    """The modes a plain `mkdir` / `open` would have given under the process umask: `mkdtemp` makes the folder
    0700, and some writers (safetensors) leave files 0600, which would hide an export from the other users of a
    shared machine."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_folder(folder, *, write: bool = True) -> Iterator[Path]:
    """Yields a temporary sibling folder to write into; on success it replaces `folder` in one rename (the old
    folder, if any, is moved aside first and deleted after), on failure it is deleted. A reader never sees a
    half-written folder. `write=False` (non-writing hosts) yields `folder` and does nothing.

    A URL folder is written to a local temporary folder and uploaded when complete (`upload_folder`: Cloud Storage
    has no folder rename, so a reader may see it part-way; config.json comes last)."""
    folder = as_path(folder, absolute=True)
    if not write:
        yield folder
        return
    if is_url(folder):
        with tempfile.TemporaryDirectory(prefix=f"{folder.name}.") as tmp:
            yield Path(tmp)
            upload_folder(Path(tmp), folder)
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / "x")
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
