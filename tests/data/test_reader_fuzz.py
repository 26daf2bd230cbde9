"""Readers never crash on a bad file: random bytes, truncated JSON lines / JSON / parquet, byte flips, non-object
lines and wrong field types, fed to every reader (prepare_data, train_rm's direct file path = `open_source`, the
`score` reader). Each ends in a one-line `DataError` naming the file, or (on_bad_row=skip) keeps every intact
good row."""

import json
import random

import pytest
from conftest import good_row

from starling_jax import prepare_data
from starling_jax.data.nectar import read_pairwise, read_rankings
from starling_jax.data.pipeline import open_source
from starling_jax.errors import StarlingError
from starling_jax.score import detect_format

GOOD = [good_row(i) for i in range(1, 9)]


def wrong_types():
    """Rows 2-7 with wrong types (row 6's extras are tolerated), plus a JSON array line and a string line."""
    rows = [dict(r) for r in GOOD]
    rows[1]["prompt"] = 12
    rows[2]["answers"] = {"answer": "x"}
    rows[3]["answers"] = [{"answer": "a", "rank": "1"}, {"answer": "b", "rank": 2}]
    rows[4]["answers"] = [{"answer": "a", "rank": 10**400}, {"answer": "b", "rank": 2}]
    rows[5].update(source=7, turns=10**400)
    rows[6]["answers"] = [{"answer": "\ud800", "rank": 1}, {"answer": "b", "rank": 2}]
    lines = [json.dumps(r) for r in rows] + ["[1, 2, 3]", '"just a string"']
    return "\n".join(lines).encode("utf-8", "surrogatepass") + b"\n"


def variants(tmp_path):
    """(name, path, row numbers that are intact good rows)"""
    rng = random.Random(0)
    text = "".join(json.dumps(r) + "\n" for r in GOOD).encode()
    lines = text.splitlines(keepends=True)
    out = []

    def add(name, data, suffix=".jsonl"):
        p = tmp_path / f"{name}{suffix}"
        p.write_bytes(data)
        intact = []
        if suffix == ".jsonl":
            got = data.splitlines(keepends=True)
            intact = [i + 1 for i, ln in enumerate(got) if i < len(lines) and ln == lines[i]]
        out.append((name, p, intact))

    add("random_bytes", bytes(rng.randrange(256) for _ in range(3000)))
    add("truncated_jsonl", text[: len(text) * 2 // 3])
    flipped = bytearray(text)
    for pos in rng.sample(range(len(text)), 6):
        flipped[pos] = rng.choice([0xFF, 0xC3, 0x00, ord("{"), ord('"')])
    add("byte_flips", bytes(flipped))
    non_utf8 = lines[:2] + [b'{"prompt": "\xff\xfe caf\xe9"}\n'] + lines[3:]
    add("latin1_line", b"".join(non_utf8))
    add("wrong_types", wrong_types())
    array = json.dumps(GOOD).encode()
    add("truncated_array", array[: len(array) // 2], ".json")
    add("non_utf8_array", array[:100] + b"\xff" + array[100:], ".json")
    add("json_scalar_file", b"[[[[[[[[" * 2000, ".json")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(GOOD), tmp_path / "good.parquet")
    data = (tmp_path / "good.parquet").read_bytes()
    add("truncated_parquet", data[: len(data) // 2], ".parquet")
    add("random_parquet", bytes(rng.randrange(256) for _ in range(500)), ".parquet")
    return out


def one_line_error(e: StarlingError, path) -> None:
    msg = str(e)
    assert "\n" not in msg and str(path) in msg, msg


def train_rm_file_rows(path, mode, tok):
    src = open_source(path, tokenizer=tok, max_length=64, on_bad_row=mode)
    return [src[i]["row"] for i in range(len(src))]


def score_reader_rows(path, mode, tok):
    reader = read_pairwise if detect_format(str(path)) == "pairwise" else read_rankings
    return [r.row for r in reader(str(path), mode)]


READERS = {"train_rm_file": train_rm_file_rows, "score_reader": score_reader_rows}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_fuzzed_files_end_in_one_line_or_skip(reader, tmp_path, tok):
    outcomes = {"error": 0, "kept": 0}
    for name, path, intact in variants(tmp_path):
        for mode in ("error", "skip"):
            try:
                kept = [int(r) for r in READERS[reader](path, mode, tok)]
            except StarlingError as e:
                one_line_error(e, path)
                outcomes["error"] += 1
                continue
            outcomes["kept"] += 1
            if mode == "skip":
                assert set(intact) <= set(kept), (name, intact, kept)
    assert outcomes["error"] >= 5 and outcomes["kept"] >= 4, outcomes


def test_prepare_data_on_fuzzed_files(tmp_path, tok_dir, capsys):
    for name, path, intact in variants(tmp_path):
        if name not in ("latin1_line", "truncated_parquet"):
            continue
        out = tmp_path / f"out_{name}"
        rc = prepare_data.main(
            [
                "--input",
                str(path),
                "--output",
                str(out),
                "--tokenizer",
                str(tok_dir),
                "--max-length",
                "64",
                "--on-bad-row",
                "skip",
                "--eval-fraction",
                "0",
            ]
        )
        cap = capsys.readouterr()
        err = [ln for ln in cap.err.splitlines() if ln.strip()]
        assert "Traceback" not in cap.err and len(err) <= 1, (name, cap.err)
        if rc == 0:
            rep = json.loads((out / "report.json").read_text())
            assert rep["rows_kept"] >= len(intact), name
        else:
            assert rc == 2 and err and err[0].startswith("error:") and str(path) in err[0], (name, err)


def test_latin1_line_is_named(tmp_path):
    name, path, _ = next(v for v in variants(tmp_path) if v[0] == "latin1_line")
    with pytest.raises(
        StarlingError, match=r"latin1_line.jsonl: row 3: line is not UTF-8 text: byte 0xff at column 13"
    ):
        list(read_rankings(path, "error"))
    kept = [r.row for r in read_rankings(path, "skip")]
    assert kept == [1, 2, 4, 5, 6, 7, 8]
