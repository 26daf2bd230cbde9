"""The judge's parts against brute force: reply parsing, the orders and pairs, the prompt, Borda and Kendall τ,
the cache's torn-line recovery, the template's checks."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy import stats

from starling_jax.errors import ConfigError
from starling_jax.judge import prompt as prompt_lib
from starling_jax.judge.aggregate import agreement, borda_scores, kendall_tau, ranks_from_scores
from starling_jax.judge.cache import Cache
from starling_jax.judge.parse import ReplyError, parse_ranking


@pytest.mark.parametrize(
    "reply, k, want",
    [
        ("Comparing... A vs B: A.\nFinal: [['C', 'A', 'B']]", 3, [2, 0, 1]),
        ("first [['A', 'B']] then corrected [[\"B\", \"A\"]]", 2, [1, 0]),  # the last list counts
        ("Ranking: ['D', 'b', 'A', 'C']", 4, [3, 1, 0, 2]),
        ("[[C, A, B]]", 3, [2, 0, 1]),
    ],
)
def test_parse_ranking(reply, k, want):
    assert parse_ranking(reply, k) == want


@pytest.mark.parametrize(
    "reply, k, reason",
    [
        ("", 3, "empty"),
        ("A is best, then C.", 3, "no ranking list"),
        ("[['A', 'B']]", 3, "2 letters, 3 expected (missing C)"),
        ("[['A', 'A', 'B']]", 3, "appears twice"),
        ("[['A', 'B', 'E']]", 3, "'E' in the ranking is not one of the letters A, B, C"),
        ("[['A', 'B', 'AB']]", 3, "not one of the letters"),
    ],
)
def test_unusable_replies_say_why(reply, k, reason):
    with pytest.raises(ReplyError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_ranking(reply, k)


@pytest.mark.parametrize("k, n", [(4, 1), (4, 2), (4, 4), (7, 3), (3, 5), (2, 2)])
def test_orders_are_seeded_balanced_shuffles(k, n):
    orders = prompt_lib.orders_for_row(0, "row-key", k, n)
    assert orders == prompt_lib.orders_for_row(0, "row-key", k, n)  # reproducible
    assert orders != prompt_lib.orders_for_row(1, "row-key", k, n)  # the seed matters
    assert all(sorted(o) == list(range(k)) for o in orders) and len(orders) == n
    balanced = orders[:k]
    for position in range(k):  # no answer at the same position twice among the first K orders
        shown = [o[position] for o in balanced]
        assert len(set(shown)) == len(shown)


def test_shuffles_are_spread_over_all_orders():
    firsts = [prompt_lib.orders_for_row(0, f"row {i}", 4, 1)[0][0] for i in range(400)]
    assert set(np.bincount(firsts, minlength=4) > 60) == {True}


def test_pairs_cover_every_pair_once_in_random_order():
    k = 5
    pairs = prompt_lib.pairs_for_order(0, "key", 2, k)
    assert sorted(tuple(sorted(p)) for p in pairs) == list(itertools.combinations("ABCDE", 2))
    assert pairs != sorted(pairs) and pairs == prompt_lib.pairs_for_order(0, "key", 2, k)
    assert pairs != prompt_lib.pairs_for_order(0, "key", 3, k)


def test_prompt_shows_answers_verbatim_in_the_order_and_every_pair():
    template = prompt_lib.load_template()
    answers = ["first {answer} $x", "second\nline", "third"]
    order = (2, 0, 1)
    pairs = prompt_lib.pairs_for_order(0, "k", 0, 3)
    messages = prompt_lib.build_messages(template, "\n\nHuman: Hi?\n\nAssistant:", answers, order, pairs)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "[Answer A]\nthird\n[End of answer A]" in user
    assert "[Answer B]\nfirst {answer} $x\n[End of answer B]" in user  # verbatim, no substitution inside
    assert "[Answer C]\nsecond\nline\n[End of answer C]" in user
    assert "User: Hi?" in user and "3 candidate answers" in user
    positions = [user.index(f"{n}. {a} vs {b}") for n, (a, b) in enumerate(pairs, start=1)]
    assert positions == sorted(positions) and user.index("[Answer C]") < positions[0]
    assert user.rstrip().endswith("exactly once and no ties.") or "final ranking" in user


def test_template_checks(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("=== user ===\nRank $answers by $rubric\n")
    with pytest.raises(ConfigError, match="unknown or malformed placeholder"):
        prompt_lib.load_template(str(bad))
    bad.write_text("=== user ===\nno answers here\n")
    with pytest.raises(ConfigError, match="must contain \\$answers"):
        prompt_lib.load_template(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        prompt_lib.load_template(str(tmp_path / "missing.txt"))
    good = tmp_path / "g.txt"
    good.write_text("=== user ===\n$conversation\n$answers\nRank $letters.\n")
    t = prompt_lib.load_template(str(good))
    assert t.system == "" and t.sha256 != prompt_lib.load_template().sha256


def test_borda_ranks_and_tau_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        k = int(rng.integers(2, 7))
        rankings = [list(rng.permutation(k)) for _ in range(int(rng.integers(1, 5)))]
        scores = borda_scores(rankings, k)
        for a in range(k):  # mean of K-1-position
            assert scores[a] == pytest.approx(np.mean([k - 1 - r.index(a) for r in rankings]))
        ranks = ranks_from_scores(scores)
        for a, b in itertools.permutations(range(k), 2):
            assert (ranks[a] < ranks[b]) == (scores[a] > scores[b])
        x, y = rng.integers(0, 3, k).astype(float), rng.standard_normal(k)
        want = stats.kendalltau(x, y).statistic
        assert kendall_tau(x, y) == pytest.approx(0.0 if np.isnan(want) else want)
    assert ranks_from_scores([3, 1, 3, 0]) == [1, 3, 1, 4]
    assert agreement([[0, 1, 2]]) is None
    assert agreement([[0, 1, 2], [0, 1, 2]]) == 1.0 and agreement([[0, 1, 2], [2, 1, 0]]) == -1.0


def test_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = Cache(path)
    cache.append({"key": "a", "attempt": 0, "ranking": [0, 1]})
    cache.close()
    with path.open("a") as f:
        f.write('{"key": "b", "attem')  # killed mid-write
    cache = Cache(path)
    assert cache.torn_lines == 1 and cache.attempts("a")[0]["ranking"] == [0, 1] and not cache.attempts("b")
    cache.append({"key": "b", "attempt": 0, "ranking": [1, 0]})
    cache.close()
    again = Cache(path)
    assert again.attempts("b")[0]["ranking"] == [1, 0] and again.torn_lines == 1
    assert json.loads(path.read_text().splitlines()[-1])["key"] == "b"
