"""A small OpenAI-compatible chat-completions server for the tests (stdlib http.server in a thread, 127.0.0.1 only).

It plays a judge with a KNOWN ground truth, positional bias and noise: every answer text it is shown maps to a true
quality (`qualities`); its ranking of the shown letters is by quality + Gaussian noise (σ = `noise`), and with
probability `bias` it moves the answer shown as A to the top. Randomness is seeded by the request, so the same
request always gets the same reply. Faults (`faults`, chosen per request key by hash, first hit only unless said):
429 with Retry-After, 500, a reply slower than the client's timeout, an unparseable reply, and keys whose replies
are never parseable. It counts what it received per (key, attempt) and how it answered.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

ANSWER = re.compile(r"\[Answer ([A-Z])\]\n(.*?)\n\[End of answer \1\]", re.DOTALL)


def key_of(messages) -> str:
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    return hashlib.sha256(first_user.encode()).hexdigest()


def _fraction(key: str, salt: str) -> float:
    return int(hashlib.sha256((key + salt).encode()).hexdigest()[:8], 16) / 16**8


class FakeJudge:
    def __init__(
        self,
        qualities: dict[str, float],
        *,
        bias: float = 0.0,
        noise: float = 0.0,
        faults=None,
        slow_s: float = 0.0,
        on_request=None,
    ):
        self.qualities = qualities
        self.bias, self.noise = bias, noise
        # fraction of keys per fault: {"429": f, "500": f, "timeout": f, "unparseable": f, "never": f}
        self.faults = faults or {}
        self.slow_s = slow_s  # how long a "timeout" fault sleeps
        # called with the running request count before answering; True = it killed the client (nothing answered)
        self.on_request = on_request
        self.lock = threading.Lock()
        self.received: dict[tuple[str, int], list[str]] = defaultdict(list)
        self.authorization: set[str] = set()
        self.count = 0

    # ------------------------------------------------------------------ judging
    def ranking(self, key: str, shown: list[tuple[str, str]]) -> list[str]:
        rng = np.random.default_rng(int(key[:12], 16))
        score = {letter: self.qualities[text] + self.noise * rng.standard_normal() for letter, text in shown}
        order = sorted(score, key=lambda x: -score[x])
        if rng.random() < self.bias:
            order.remove("A")
            order.insert(0, "A")
        return order

    def fault(self, key: str, attempt: int) -> str | None:
        seen = self.received[(key, attempt)]
        edges, start = [], 0.0
        for name in ("429", "500", "timeout", "unparseable", "never"):
            edges.append((name, start, start + self.faults.get(name, 0.0)))
            start += self.faults.get(name, 0.0)
        u = _fraction(key, "fault")
        name = next((n for n, lo, hi in edges if lo <= u < hi), None)
        if name == "never":
            return "unparseable"
        if (
            name in ("429", "500", "timeout")
            and not any(s != "ok" and s != "unparseable" for s in seen)
            and attempt == 0
        ):
            return name
        if name == "unparseable" and attempt == 0:
            return name
        return None

    def handle(self, body: dict, authorization: str):
        messages = body["messages"]
        key = key_of(messages)
        attempt = sum(m["role"] == "user" for m in messages) - 1
        with self.lock:
            self.count += 1
            self.authorization.add(authorization)
            fault = self.fault(key, attempt)
            outcome = {"429": "429", "500": "500", "timeout": "timeout"}.get(fault, "")
            self.received[(key, attempt)].append(outcome or "pending")
            slot = len(self.received[(key, attempt)]) - 1
            count = self.count
        if self.on_request is not None and self.on_request(count):  # the hook killed the client: no answer
            with self.lock:
                self.received[(key, attempt)][slot] = "killed"
            return 500, {"error": {"message": "client gone"}}, {}
        if fault == "429":
            return 429, {"error": {"message": "rate limited", "type": "rate_limit"}}, {"Retry-After": "0.01"}
        if fault == "500":
            return 500, {"error": {"message": "internal error", "type": "server_error"}}, {}
        if fault == "timeout":
            time.sleep(self.slow_s)
        first_user = next(m["content"] for m in messages if m["role"] == "user")
        shown = ANSWER.findall(first_user)
        if fault == "unparseable":
            reply = "I think the first one is best, all things considered."
        else:
            reply = "Pairs compared.\n" + repr([self.ranking(key, shown)])
        with self.lock:
            if fault != "timeout":
                self.received[(key, attempt)][slot] = "unparseable" if fault == "unparseable" else "ok"
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        return (
            200,
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(reply.split()),
                    "total_tokens": prompt_tokens + len(reply.split()),
                },
            },
            {},
        )

    # ------------------------------------------------------------------ counts
    def answered(self) -> dict[str, int]:
        """key → number of usable (ranked) 200 replies sent for it, over all attempts."""
        out: dict[str, int] = defaultdict(int)
        for (key, _), outcomes in self.received.items():
            out[key] += outcomes.count("ok")
        return out

    def replies(self, key: str) -> int:
        """200 replies (usable or not) sent for a key, timeouts excluded."""
        return sum(o.count("ok") + o.count("unparseable") for (k, _), o in self.received.items() if k == key)


class Server:
    """`with Server(judge) as s:` → s.base_url (http://127.0.0.1:PORT/v1)."""

    def __init__(self, judge: FakeJudge):
        self.judge = judge
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                if not self.path.endswith("/chat/completions"):
                    status, payload, headers = 404, {"error": {"message": "not found"}}, {}
                else:
                    status, payload, headers = owner.judge.handle(body, self.headers.get("Authorization", ""))
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) or was killed
                    pass

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a killed or timed-out client resets its socket
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
