import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import good_row, write_mixed

from starling_jax.data.nectar import ReadReport, load_rankings, read_pairwise, read_rankings, split_of, validate_row
from starling_jax.errors import DataError


def test_skip_reports_every_bad_row(tmp_path):
    f = tmp_path / "mixed.jsonl"
    good, bad = write_mixed(f)
    rep = ReadReport()
    got = load_rankings(f, "skip", rep)
    assert [r.row for r in got] == good
    assert rep.rows_read == len(good) + len(bad) and rep.rows_kept == len(good) and rep.rows_skipped == len(bad)
    assert [s["row"] for s in rep.skipped] == sorted(bad)
    for s in rep.skipped:
        assert bad[s["row"]] in s["reason"], s
    assert got[1].num_answers == 7 and got[-2].num_answers == 2


def test_error_stops_at_first_bad_row(tmp_path):
    f = tmp_path / "mixed.jsonl"
    good, bad = write_mixed(f)
    first = min(bad)
    seen = []
    with pytest.raises(DataError, match=rf"mixed.jsonl: row {first}: .*rank' is missing"):
        for r in read_rankings(f, "error"):
            seen.append(r.row)
    assert seen == [g for g in good if g < first]


def test_bad_fields():
    assert validate_row(good_row(1), 1).ranks == (1.0, 2.0, 3.0)
    for mutate, msg in [
        (lambda r: r["answers"][0].__setitem__("answer", None), "answers[0].answer' is missing"),
        (lambda r: r["answers"][0].__setitem__("answer", 3), "answers[0].answer' is int"),
        (lambda r: r["answers"][0].__setitem__("rank", "1"), "answers[0].rank' is str"),
        (lambda r: r["answers"][0].__setitem__("rank", math.inf), "not finite"),
        (lambda r: r["answers"][0].__setitem__("rank", True), "bool"),
        (lambda r: r.pop("answers"), "'answers' is missing"),
    ]:
        r = good_row(1)
        mutate(r)
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            validate_row(r, 1)


def test_formats_agree(tmp_path):
    rows = [good_row(i, n=2 + i % 3) for i in range(20)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet", row_group_size=7)
    res = [load_rankings(tmp_path / f"a.{ext}") for ext in ("jsonl", "json", "parquet")]
    assert res[0] == res[1] == res[2]
    assert [r.row for r in res[2]] == list(range(1, 21))
    assert res[0][4].models == ("m0", "m1", "m2") and res[0][4].sources == ("test",)


def test_missing_input(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list(read_rankings(tmp_path / "nope.jsonl"))


def test_pairwise(tmp_path):
    f = tmp_path / "rb.jsonl"
    f.write_text(
        json.dumps({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "subset": "math"})
        + "\n"
        + json.dumps({"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": "hello", "rejected": ""})
        + "\n"
    )
    rs = list(read_pairwise(f))
    assert rs[0].messages == ({"role": "user", "content": "What is 2+2?"},)
    assert rs[0].answers == ("4", "5") and rs[0].ranks == (1.0, 2.0) and rs[0].sources == ("math",)
    assert rs[1].answers == ("hello", "")


def test_split_deterministic_by_prompt():
    prompts = [f"\n\nHuman: q{i}\n\nAssistant:" for i in range(2000)]
    s1 = [split_of(p, 0.1) for p in prompts]
    assert s1 == [split_of(p, 0.1) for p in prompts]
    frac = s1.count("eval") / len(s1)
    assert 0.07 < frac < 0.13
    assert all(split_of(p, 0.0) == "train" for p in prompts[:50])
