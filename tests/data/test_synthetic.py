import json
from collections import Counter

from starling_jax.data.chat import parse_hh
from starling_jax.data.nectar import load_rankings
from starling_jax.data.synthetic import WORDS, bundled_path, generate
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
            # the answer alone does not reveal it: another word is as frequent as the target
            top = Counter(a["answer"].split()).most_common()
            assert c == 0 or sum(n == c for _, n in top) >= 2 or top[0][1] > c
        ties += len(set(counts)) < len(counts)
        multi += r["turns"] == 2
        short += len(r["answers"]) < 7
    assert ties > 0 and multi > 30 and short > 30


def test_bundled_file(tok):
    p = bundled_path()
    assert p.is_file() and p.stat().st_size < 3_000_000
    with open(p) as f:
        first = [json.loads(next(f)) for _ in range(50)]
    assert first == generate(50, seed=0)  # the bundled file is generate(3000, seed=0)
    rs = load_rankings(p)
    assert len(rs) == 3000
    longest = max(max(len(t) for t in tokenize_ranking(r, tok, "llama2_chat", 512).tokens) for r in rs[:300])
    assert longest < 128
