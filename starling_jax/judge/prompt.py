"""The judge prompt: a template file, the orders in which a row's answers are shown, and the messages built from
them (the Nectar procedure: answers verbatim, labelled A, B, C, ... in the order shown; every pair of letters
listed in a random order before the request for one final ranking).

A template is a text file of two sections, `=== system ===` (optional) and `=== user ===`, with `$`-placeholders
(`string.Template`; `$$` is a literal `$`): `$conversation` (the HH prompt's turns), `$answers` (the labelled
answers), `$pairs` (the numbered pairs), `$letters` (`A, B, C, D`), `$k`, `$example_first`, `$example_second`
(two letters for the format example). The package ships `resources/judge_nectar.txt` (a helpfulness and
harmlessness rubric written for this project); `--judge-template FILE` replaces it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import string
from importlib import resources
from pathlib import Path

import numpy as np

from starling_jax.data.chat import parse_hh
from starling_jax.errors import ConfigError

LETTERS = string.ascii_uppercase
DEFAULT_TEMPLATE = "judge_nectar.txt"
PLACEHOLDERS = ("conversation", "answers", "pairs", "letters", "k", "example_first", "example_second")


@dataclasses.dataclass(frozen=True)
class Template:
    name: str  # the file it came from
    system: str
    user: str
    sha256: str  # of the file's text: part of every cache key

    def render(self, values: dict) -> list[dict]:
        messages = (
            [{"role": "system", "content": string.Template(self.system).substitute(values)}] if self.system else []
        )
        messages.append({"role": "user", "content": string.Template(self.user).substitute(values)})
        return messages


def load_template(path: str | None = None) -> Template:
    """The shipped template (None) or `path`; a malformed one is a one-line ConfigError."""
    if path is None:
        text = resources.files("starling_jax").joinpath("resources", DEFAULT_TEMPLATE).read_text(encoding="utf-8")
        name = f"starling_jax/resources/{DEFAULT_TEMPLATE}"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--judge-template {path}: cannot read it ({type(e).__name__}: {e})") from None
        name = str(path)
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        head = line.strip()
        if head.startswith("===") and head.endswith("===") and head.strip("= ").lower() in ("system", "user"):
            current = head.strip("= ").lower()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif head:
            raise ConfigError(f"--judge-template {name}: text before the first '=== system ===' or '=== user ===' line")
    if "user" not in sections:
        raise ConfigError(f"--judge-template {name}: no '=== user ===' section")
    template = Template(
        name,
        "\n".join(sections.get("system", [])).strip(),
        "\n".join(sections["user"]).strip(),
        hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )
    try:  # every placeholder must be known: fail at start, not on the first row
        template.render({p: "x" for p in PLACEHOLDERS})
    except (KeyError, ValueError) as e:
        raise ConfigError(
            f"--judge-template {name}: unknown or malformed placeholder {e} (known: "
            f"{', '.join('$' + p for p in PLACEHOLDERS)})"
        ) from None
    if "$answers" not in template.user and "${answers}" not in template.user:
        raise ConfigError(f"--judge-template {name}: the user section must contain $answers")
    return template


def _rng(seed: int, content_key: str, *salt) -> np.random.Generator:
    digest = hashlib.sha256(repr((int(seed), content_key, *salt)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def orders_for_row(seed: int, content_key: str, k: int, n: int) -> list[tuple[int, ...]]:
    """N orders (each: answer indices in the order shown, position 0 = letter A) for a row, from `seed` and the
    row's content. Order 0 is a seeded shuffle; for N ≤ K, order o is that shuffle rotated by round(o·K/N)
    positions, so no answer is shown at the same position twice (with N = K every answer is shown at every
    position exactly once, and a positional bias cancels in the Borda aggregate); orders past K are fresh
    shuffles."""
    rng = _rng(seed, content_key, "orders")
    base = [int(i) for i in rng.permutation(k)]
    orders = []
    for o in range(n):
        if o < k:
            shift = round(o * k / min(n, k))
            orders.append(tuple(base[shift:] + base[:shift]))
        else:
            orders.append(tuple(int(i) for i in rng.permutation(k)))
    return orders


def pairs_for_order(seed: int, content_key: str, order_index: int, k: int) -> list[tuple[str, str]]:
    """Every unordered pair of the K letters once, in a seeded random order, each pair's two letters in a random
    order too."""
    rng = _rng(seed, content_key, "pairs", order_index)
    pairs = list(itertools.combinations(LETTERS[:k], 2))
    out = []
    for i in rng.permutation(len(pairs)):
        a, b = pairs[int(i)]
        out.append((a, b) if rng.random() < 0.5 else (b, a))
    return out


def conversation_text(prompt: str) -> str:
    """The HH prompt's turns as `User:` / `Assistant:` blocks (the open final Assistant turn left out)."""
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in parse_hh(prompt))


def build_messages(template: Template, prompt: str, answers, order, pairs) -> list[dict]:
    """The chat messages of one request: answers[order[i]] is shown verbatim as letter LETTERS[i]."""
    k = len(order)
    blocks = "\n\n".join(
        f"[Answer {LETTERS[i]}]\n{answers[j]}\n[End of answer {LETTERS[i]}]" for i, j in enumerate(order)
    )
    pair_lines = "\n".join(f"{n}. {a} vs {b}" for n, (a, b) in enumerate(pairs, start=1))
    return template.render(
        {
            "conversation": conversation_text(prompt),
            "answers": blocks,
            "pairs": pair_lines,
            "letters": ", ".join(LETTERS[:k]),
            "k": str(k),
            "example_first": LETTERS[k - 1],
            "example_second": LETTERS[0],
        }
    )


REASK = (
    "Your reply did not end with a usable ranking: {reason}. Reply with only the final ranking of all {k} "
    "answers, best first, as one Python list holding one list of the letters {letters}, each exactly once, "
    "for example [['{first}', '{second}', ...]]."
)


def reask_message(reason: str, k: int) -> dict:
    return {
        "role": "user",
        "content": REASK.format(
            reason=reason, k=k, letters=", ".join(LETTERS[:k]), first=LETTERS[k - 1], second=LETTERS[0]
        ),
    }
