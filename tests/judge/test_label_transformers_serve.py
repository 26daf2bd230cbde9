"""`transformers serve` (a real OpenAI-compatible server: FastAPI + uvicorn, transformers' own generation) with a
tiny random model from the tests as the judge: requests go through the real server and the real `openai` client,
the tiny model's unparseable rankings are re-asked, then the rows are rejected with the reasons.

Needs transformers' `serving` extra (fastapi, uvicorn, starlette; in the dev extra). Where they are missing the
test is skipped with that reason."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.model.hf_fixtures import make_hf_model, require_torch, rewrite_config

require_torch()

from starling_jax import label as label_lib  # noqa: E402
from starling_jax.data.tokenizer import default_tokenizer_for  # noqa: E402

for module in ("fastapi", "uvicorn", "starlette"):
    pytest.importorskip(
        module,
        reason="`transformers serve` needs transformers[serving] (fastapi, uvicorn, "
        "starlette): pip install 'starling_jax[dev]'",
    )

pytestmark = pytest.mark.slow  # the server's start-up (tens of seconds on 2 cores)
STARTUP_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_hf_model(
        tmp_path_factory.mktemp("judge") / "tiny", "llama", "lm", vocab=32000, hidden=32, layers=1, heads=4, inter=64
    )
    rewrite_config(folder, max_position_embeddings=4096)  # the judge prompt is ~1k tokens
    for f in default_tokenizer_for("llama2_chat").iterdir():  # a real tokenizer with a chat template
        shutil.copy(f, folder / f.name)
    port = free_port()
    log = open(folder.parent / "serve.log", "w")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "transformers"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--log-level",
            "info",
            str(folder),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + STARTUP_S
    try:
        while True:  # bounded wait for /health
            if proc.poll() is not None:
                pytest.fail(
                    f"transformers serve exited {proc.returncode}: {(folder.parent / 'serve.log').read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve not healthy after {STARTUP_S} s")
            time.sleep(1)
        yield folder, f"http://127.0.0.1:{port}/v1", folder.parent / "serve.log"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_unparseable_rankings_from_transformers_serve_are_reasked_then_rejected(server, tmp_path, monkeypatch):
    folder, base_url, serve_log = server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local-not-checked")
    rows = [
        {
            "prompt": f"\n\nHuman: Question {i}?\n\nAssistant:",
            "answers": [{"answer": f"Answer {j} to {i}.", "model": f"m{j}"} for j in range(3)],
        }
        for i in range(2)
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "labelled.jsonl"
    summary = label_lib.label(
        str(data),
        str(out),
        f"openai:{folder}",
        base_url=base_url,
        max_tokens=12,
        max_attempts=2,
        concurrency=2,
        timeout=120,
        progress=False,
    )
    assert summary["rows"] == 2 and summary["labelled"] == 0 and summary["rejected"] == 2
    assert summary["requests"] == 4 and summary["retries"] == 0  # 2 rows × 2 attempts, all answered
    assert summary["prompt_tokens"] > 1000 and summary["completion_tokens"] > 0  # the server's usage fields
    rejects = [json.loads(line) for line in Path(f"{out}.rejects.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in rejects) == [1, 2]
    assert all(r["reason"].startswith("unusable reply: ") and "(2 of 2 attempts)" in r["reason"] for r in rejects)
    cache = [json.loads(line) for line in Path(f"{out}.cache.jsonl").read_text().splitlines()]
    assert sorted((c["row"], c["attempt"]) for c in cache) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(c["reply"] and c["error"] for c in cache)  # the model's own text, and why it is not a ranking
    assert serve_log.read_text().count('POST /v1/chat/completions HTTP/1.1" 200') >= 4
    # restarted, nothing is sent again: the attempts are used up and on disk
    again = label_lib.label(
        str(data), str(out), f"openai:{folder}", base_url=base_url, max_tokens=12, max_attempts=2, progress=False
    )
    assert again["requests"] == 0 and again["rejected"] == 2
