"""An OpenAI-compatible chat-completions judge (OpenAI, `vllm serve`, `transformers serve`, ...) through the
`openai` client, with bounded retries.

The API key comes from the environment variable OPENAI_API_KEY only (never a flag or a file) and is never written
to a file or a log line: error messages here are built from the status code and the server's error text only. With
`--base-url` and no OPENAI_API_KEY a placeholder key is sent (local servers such as vLLM accept any).

Retries: a rate limit (429), a server error (5xx), a timeout or a dropped connection is retried after an
exponential backoff (base · 2^n, at most 60 s, ± 25 % jitter, or the server's `Retry-After` when it sends one) up to
`max_retries` times; then the request fails with `TransportError` (the row is rejected for this run and will be sent
again by the next one, since nothing was answered). Any other 4xx (bad model name, bad key) is a `JudgeError` that
stops the run: retrying cannot help.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
import time

from starling_jax.errors import StarlingError

KEY_VARIABLE = "OPENAI_API_KEY"
PLACEHOLDER_KEY = "EMPTY"
MAX_BACKOFF_S = 60.0


class JudgeError(StarlingError):
    """The judge cannot be used (bad model, rejected key, malformed base URL): the run stops."""


class TransportError(Exception):
    """A request still failing after every retry (reason in the message)."""


@dataclasses.dataclass
class Usage:
    requests: int = 0  # HTTP requests sent (retries included)
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __post_init__(self):
        self._lock = threading.Lock()

    def add(self, **counts) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + int(value or 0))


class OpenAIJudge:
    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff_s: float = 1.0,
        temperature: float = 0.0,
        max_tokens: int | None = None,
    ):
        try:
            import openai  # the `label` extra: only LLM judges need it
        except ImportError:
            raise JudgeError("--judge openai:... needs the openai client: pip install 'starling_jax[label]'") from None

        key = os.environ.get(KEY_VARIABLE)
        if not key:
            if base_url is None:
                raise JudgeError(
                    f"{KEY_VARIABLE} is not set: the OpenAI API needs a key (or pass --base-url for a "
                    "server that needs none)"
                )
            key = PLACEHOLDER_KEY
        self._openai = openai
        # the client's own retries are off: ours count them and keep to `max_retries`
        self.client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)
        self.model = model
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.usage = Usage()

    def _retry_after(self, error) -> float | None:
        response = getattr(error, "response", None)
        value = response.headers.get("retry-after") if response is not None else None
        try:
            return min(float(value), MAX_BACKOFF_S) if value is not None else None
        except ValueError:
            return None

    def complete(self, messages: list[dict]) -> str:
        """The reply text of one chat completion (temperature `temperature`), retried as the module says."""
        openai = self._openai
        kwargs = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens:
            kwargs["max_tokens"] = int(self.max_tokens)
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.usage.add(retries=1)
            self.usage.add(requests=1)
            try:
                response = self.client.chat.completions.create(**kwargs)
            except openai.APITimeoutError:
                last, wait = "timed out", None
            except openai.APIConnectionError as e:
                last, wait = f"connection failed ({type(e.__cause__ or e).__name__})", None
            except openai.APIStatusError as e:
                status = e.status_code
                if status != 429 and status < 500 and status != 408:
                    raise JudgeError(
                        f"judge {self.model}: the server refused the request: HTTP {status}: {_error_text(e)}"
                    ) from None
                last, wait = f"HTTP {status}: {_error_text(e)}", self._retry_after(e)
            else:
                usage = getattr(response, "usage", None)
                if usage is not None:
                    self.usage.add(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
                if not response.choices:
                    return ""
                return response.choices[0].message.content or ""
            if attempt < self.max_retries:
                delay = wait if wait is not None else min(self.backoff_s * 2**attempt, MAX_BACKOFF_S)
                time.sleep(delay * random.uniform(0.75, 1.25))
        raise TransportError(f"{last} (after {self.max_retries} retries)")


def _error_text(error) -> str:
    """The server's error message (not the request, whose headers hold the key), on one line, shortened."""
    body = getattr(error, "body", None)
    text = body.get("message") if isinstance(body, dict) else None
    text = text or getattr(error, "message", "") or type(error).__name__
    text = " ".join(str(text).split())
    return text[:200]
