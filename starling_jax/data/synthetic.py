"""Synthetic Nectar-format rankings with a signal that needs the prompt AND the answer.

Each row's (last) user turn asks for a word chosen at random from a small vocabulary of single-token English
words; every answer is a short sequence of words from the same vocabulary, and answers are ranked by how often
they contain the requested word (more = better; equal counts tie). Every answer also repeats other vocabulary
words as often as the requested one, so an answer alone says nothing about its rank: a model must read the
prompt together with the answer (broken attention masks make it unlearnable). Answer length does not depend on
the rank. Some rows are multi-turn (an earlier turn asks for a different word: only the last request counts),
some have 3-6 answers. Whole sequences stay < 128 tokens with the llama2_chat template.

`python -m starling_jax.data.synthetic OUT.jsonl [--rows N] [--seed S]` writes a file; the bundled
`starling_jax/resources/nectar_synthetic.jsonl` is `--rows 3000 --seed 0`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

WORDS = ("apple", "river", "stone", "cloud", "green", "music", "table", "horse", "water", "paper", "chair", "bird")
REQUESTS = (
    "Write a short line that uses the word {w} as often as you can.",
    "Please repeat the word {w} many times in a sentence.",
    "I love the word {w}. Say it as many times as possible.",
)
BUNDLED = "nectar_synthetic.jsonl"


def bundled_path() -> Path:
    """Path of the bundled synthetic file (3000 rows)."""
    return Path(__file__).resolve().parent.parent / "resources" / BUNDLED


def make_row(rng: np.random.Generator, num_answers: int = 7, answer_words: int = 12, multi_turn: float = 0.3,
             tie_prob: float = 0.1) -> dict:
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
    max_count = answer_words // 2
    counts = rng.choice(max_count + 1, size=num_answers, replace=num_answers > max_count + 1)
    if num_answers > 2 and rng.random() < tie_prob:
        i, j = rng.choice(num_answers, size=2, replace=False)
        counts[j] = counts[i]
    answers = []
    for k, c in enumerate(counts):
        c = int(c)
        others = [x for x in range(len(WORDS)) if x != target]
        # a distractor word appears as often as the target, so counts alone do not reveal the rank
        distract = int(rng.choice(others))
        rest = [int(rng.choice([x for x in others if x != distract])) for _ in range(answer_words - 2 * c)]
        seq = [target] * c + [distract] * c + rest
        rng.shuffle(seq)
        answers.append({"answer": " ".join(WORDS[x] for x in seq), "model": f"synth-{k}", "count": c})
    order = sorted(range(num_answers), key=lambda k: -answers[k]["count"])
    ranks = [0] * num_answers
    for pos, k in enumerate(order):
        prev = order[pos - 1] if pos else None
        same = prev is not None and answers[prev]["count"] == answers[k]["count"]
        ranks[k] = ranks[prev] if same else pos + 1
    out_answers = [{"answer": a["answer"], "model": a["model"], "rank": float(ranks[k])}
                   for k, a in enumerate(answers)]
    return {"prompt": prompt, "answers": out_answers, "turns": turns, "num_responses": num_answers,
            "source": ["synthetic"], "good_natured": True}


def generate(num_rows: int, seed: int = 0, min_answers: int = 3, max_answers: int = 7,
             full_prob: float = 0.7) -> list[dict]:
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output")
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    p = write_jsonl(generate(a.rows, a.seed), a.output)
    print(json.dumps({"rows": a.rows, "output": str(p)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
