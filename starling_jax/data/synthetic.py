"""Synthetic Nectar-format rankings with a signal that needs the prompt AND the answer.

Each row's (last) user turn asks for a word chosen at random from a small vocabulary of single-token English
words; every answer is a short sequence of words from the same vocabulary, and answers are ranked by how often
they contain the requested word (more = better; equal counts tie). Every answer uses four distinct vocabulary
words 4, 3, 2 and 1 times, whatever its rank (the requested word holds one of those counts, or is absent), so
an answer alone says nothing about its rank: a model must read the prompt together with the answer (broken
attention masks make it unlearnable; tests/data/test_synthetic.py checks that no answer-only statistic ranks).
Answer length varies through filler words drawn independently of the rank. Some rows are multi-turn (an earlier
turn asks for a different word: only the last request counts), some have 3-6 answers. Whole sequences stay < 128 tokens
with the llama2_chat template.

`python -m starling_jax.data.synthetic OUT.jsonl [--rows N] [--seed S]` writes a file; the bundled
`starling_jax/resources/nectar_synthetic.jsonl` is `--rows 3000 --seed 0`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from starling_jax import cli
from starling_jax.data.bundled import BUNDLED, BUNDLED_ALIAS, bundled_path, resolve_bundled  # noqa: F401 - re-exported

WORDS = ("apple", "river", "stone", "cloud", "green", "music", "table", "horse")
# Never requested: pad answers to a length drawn independently of the rank (so length carries no signal, but
# the reward/length correlation metric has something to measure).
FILLERS = ("well", "so", "okay", "indeed")
# Every answer uses exactly four distinct vocabulary words with these multiplicities, whatever its rank:
# the requested word takes one of them (or none), so an answer's own word-count profile is the same at
# every rank and only the prompt says which of its words counts.
MULTIPLICITIES = (4, 3, 2, 1)
# The requested word ends the user turn (right before the template's end-of-turn marker), whatever the phrasing.
REQUESTS = (
    "Write a short line that uses this word as often as you can: {w}",
    "Please repeat the following word many times in a sentence: {w}",
    "I love one word. Say it as many times as possible: {w}",
)


def make_answer(rng: np.random.Generator, target: int, count: int, max_fillers: int = 3) -> str:
    """An answer where word `target` appears `count` times (0 or one of MULTIPLICITIES), other words fill the
    remaining multiplicities, plus 0..max_fillers filler words; shuffled."""
    others = [x for x in range(len(WORDS)) if x != target]
    mults = list(MULTIPLICITIES)
    words = []
    if count:
        mults.remove(count)
        words += [target] * count
    for x, m in zip(rng.permutation(others)[: len(mults)], mults):
        words += [int(x)] * m
    seq = [WORDS[x] for x in words] + [str(rng.choice(FILLERS)) for _ in range(int(rng.integers(max_fillers + 1)))]
    rng.shuffle(seq)
    return " ".join(seq)


def make_row(rng: np.random.Generator, num_answers: int = 7, multi_turn: float = 0.3) -> dict:
    """One Nectar-format row: the last user turn requests a word; answers rank by how often they use it."""
    target = int(rng.integers(len(WORDS)))
    w = WORDS[target]
    prompt = ""
    turns = 1
    if rng.random() < multi_turn:
        other = WORDS[(target + 1 + int(rng.integers(len(WORDS) - 1))) % len(WORDS)]
        prompt += f"\n\nHuman: {REQUESTS[int(rng.integers(len(REQUESTS)))].format(w=other)}"
        prompt += f"\n\nAssistant: {' '.join([other] * int(rng.integers(1, 4)))}"
        turns = 2
    prompt += f"\n\nHuman: {REQUESTS[int(rng.integers(len(REQUESTS)))].format(w=w)}\n\nAssistant:"
    # five possible counts (0 and the multiplicities): 7 answers always hold ties, shorter rows sometimes
    choices = (0,) + MULTIPLICITIES
    counts = rng.choice(choices, size=num_answers, replace=num_answers > len(choices))
    answers = [make_answer(rng, target, int(c)) for c in counts]
    ranks = [float(1 + sum(d > c for d in counts)) for c in counts]  # competition ranks: equal counts tie
    out_answers = [{"answer": a, "model": f"synth-{k}", "rank": r} for k, (a, r) in enumerate(zip(answers, ranks))]
    return {
        "prompt": prompt,
        "answers": out_answers,
        "turns": turns,
        "num_responses": num_answers,
        "source": ["synthetic"],
        "good_natured": True,
    }


def generate(
    num_rows: int, seed: int = 0, min_answers: int = 3, max_answers: int = 7, full_prob: float = 0.7
) -> list[dict]:
    """`num_rows` rows; `full_prob` of them have `max_answers` answers, the rest 3..max-1."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_rows):
        k = max_answers if rng.random() < full_prob else int(rng.integers(min_answers, max_answers))
        rows.append(make_row(rng, num_answers=k))
    return rows


def write_jsonl(rows, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m starling_jax.data.synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("output")
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)

    def run():
        a = ap.parse_args(argv)  # usage errors: one line (cli.ArgumentParser)
        p = write_jsonl(generate(a.rows, a.seed), a.output)
        return {"status": "completed", "rows": a.rows, "output": str(p)}

    return cli.run_main(run)


if __name__ == "__main__":
    raise SystemExit(main())
