import json
from collections import Counter

import numpy as np

from starling_jax.data.chat import parse_hh
from starling_jax.data.nectar import load_rankings
from starling_jax.data.synthetic import FILLERS, MULTIPLICITIES, WORDS, bundled_path, generate
from starling_jax.data.tokenize import tokenize_ranking


def _target(prompt):
    last = parse_hh(prompt)[-1]["content"]
    return next(w for w in WORDS if f" {w} " in f" {last} ".replace(".", " "))


def test_schema_and_signal():
    rows = generate(300, seed=1)
    keys = {"prompt", "answers", "turns", "num_responses", "source", "good_natured"}
    ties = multi = short = 0
    for r in rows:
        assert set(r) == keys and r["num_responses"] == len(r["answers"]) and 3 <= len(r["answers"]) <= 7
        assert all(set(a) == {"answer", "model", "rank"} and isinstance(a["rank"], float) for a in r["answers"])
        w = _target(r["prompt"])
        counts = [a["answer"].split().count(w) for a in r["answers"]]
        # rank is determined by the count of the word the (last) prompt turn asks for
        for a, c in zip(r["answers"], counts):
            for b, d in zip(r["answers"], counts):
                assert (a["rank"] < b["rank"]) == (c > d)
        ties += len(set(counts)) < len(counts)
        multi += r["turns"] == 2
        short += len(r["answers"]) < 7
    assert ties > 0 and multi > 30 and short > 30


def test_answer_alone_has_the_same_word_profile_at_every_rank():
    for r in generate(200, seed=2):
        for a in r["answers"]:
            vocab = Counter(x for x in a["answer"].split() if x in WORDS)
            assert sorted(vocab.values(), reverse=True) == list(MULTIPLICITIES)
            assert all(x in WORDS or x in FILLERS for x in a["answer"].split())


def _pairwise_accuracy(rows, scores):
    right = total = 0
    for r, s in zip(rows, scores):
        ranks = [a["rank"] for a in r["answers"]]
        for i in range(len(ranks)):
            for j in range(len(ranks)):
                if ranks[i] < ranks[j]:
                    total += 1
                    right += s[i] > s[j]
    return right / total


def _fit_and_score(train, test, features):
    """Least squares from per-answer features to the row-centred -rank; scores on `test` rows."""
    x = np.concatenate([np.stack([features(r, a) for a in r["answers"]]) for r in train])
    y = np.concatenate(
        [-(np.array(ranks) - np.mean(ranks)) for ranks in ([a["rank"] for a in r["answers"]] for r in train)]
    )
    w, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)
    return [[float(np.r_[features(r, a), 1.0] @ w) for a in r["answers"]] for r in test]


def test_no_answer_only_statistic_predicts_the_rank():
    """A reward read from the answer alone (bag of words, word-count profile, length, and their squares) ranks at
    chance on held-out rows; the same regression given the prompt's requested word ranks perfectly. This is what
    makes a broken attention mask (answer tokens not seeing the prompt) unlearnable."""
    rows = generate(3000, seed=3)
    train, test = rows[:2500], rows[2500:]
    vocab = WORDS + FILLERS

    def answer_only(r, a):
        words = a["answer"].split()
        bag = np.array([words.count(v) for v in vocab], float)
        profile = sorted(Counter(words).values(), reverse=True)[:6]
        profile += [0] * (6 - len(profile))
        return np.r_[bag, bag**2, profile, len(words), len(a["answer"])]

    def with_prompt(r, a):
        return np.r_[answer_only(r, a), a["answer"].split().count(_target(r["prompt"]))]

    blind = _pairwise_accuracy(test, _fit_and_score(train, test, answer_only))
    seeing = _pairwise_accuracy(test, _fit_and_score(train, test, with_prompt))
    assert 0.45 < blind < 0.55, blind
    assert seeing > 0.99, seeing


def test_bundled_file(tok):
    p = bundled_path()
    assert p.is_file() and p.stat().st_size < 4_000_000
    with open(p) as f:
        first = [json.loads(next(f)) for _ in range(50)]
    assert first == generate(50, seed=0)  # the bundled file is generate(3000, seed=0)
    rs = load_rankings(p)
    assert len(rs) == 3000
    longest = max(max(len(t) for t in tokenize_ranking(r, tok, "llama2_chat", 512).tokens) for r in rs[:300])
    assert longest < 128
