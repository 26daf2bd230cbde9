import json

from conftest import write_mixed

from starling_jax import prepare_data
from starling_jax.data.nectar import split_of
from starling_jax.data.pipeline import RankingPipeline, open_source


def test_prepare_skip_then_pipeline(tmp_path, tok_dir, capsys):
    f = tmp_path / "mixed.jsonl"
    good, bad = write_mixed(f)
    out = tmp_path / "out"
    rc = prepare_data.main(
        [
            "--input",
            str(f),
            "--output",
            str(out),
            "--tokenizer",
            str(tok_dir),
            "--max-length",
            "64",
            "--on-bad-row",
            "skip",
            "--eval-fraction",
            "0.3",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        summary["status"] == "completed" and summary["rows_kept"] == len(good) and summary["rows_skipped"] == len(bad)
    )
    assert summary["output_dir"] == str(out)
    rep = json.loads((out / "report.json").read_text())
    assert rep["rows_read"] == len(good) + len(bad)
    assert [s["row"] for s in rep["skipped"]] == sorted(bad)
    assert all(bad[s["row"]] in s["reason"] for s in rep["skipped"])
    assert rep["lengths"]["sequence_tokens"]["max"] <= 64 and "rows_truncated" in rep
    # every good row arrives, in the split its prompt hash says
    rows = {}
    for split in ("train", "eval"):
        src = open_source(out, split)
        assert src.metadata["template"] == "llama2_chat" and src.metadata["max_length"] == 64
        # the rows prepare_data skipped reach train_rm's rows_skipped (README)
        assert sorted(s["row"] for s in src.report.skipped) == sorted(bad) and src.report.source == str(f)
        for i in range(len(src)):
            ex = src[i]
            rows[int(ex["row"])] = split
            assert [int(r) for r in ex["reward_index"]] == [len(t) - 1 for t in ex["tokens"]]
    assert sorted(rows) == good
    lines = f.read_text().splitlines()
    for r, s in rows.items():
        assert split_of(json.loads(lines[r - 1])["prompt"], 0.3) == s
    p = RankingPipeline(open_source(out, "train"), global_batch_size=4, mode="eval", process_index=0, process_count=1)
    seen = [r for b in p for r in b["row"].tolist() if r >= 0]
    assert sorted(seen) == sorted(r for r, s in rows.items() if s == "train")


def test_prepare_error_stops(tmp_path, tok_dir, capsys):
    f = tmp_path / "mixed.jsonl"
    good, bad = write_mixed(f)
    rc = prepare_data.main(
        ["--input", str(f), "--output", str(tmp_path / "o"), "--tokenizer", str(tok_dir), "--on-bad-row", "error"]
    )
    assert rc != 0
    cap = capsys.readouterr()
    assert f"row {min(bad)}" in cap.err and "rank" in cap.err
    assert json.loads(cap.out.strip().splitlines()[-1])["status"] == "error"


def test_prepare_row_that_cannot_fit_is_reported(tmp_path, tok_dir, capsys):
    f = tmp_path / "a.jsonl"
    rows = [
        {"prompt": "\n\nHuman: hi\n\nAssistant:", "answers": [{"answer": "a", "rank": 1}, {"answer": "b", "rank": 2}]}
    ] * 2
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # on_bad_row=error (the default) stops at the first row that cannot fit, naming it (chatml's end-of-turn suffix
    # is 7 tokens: with the prompt's least kept part no answer fits in 8)
    rc = prepare_data.main(
        [
            "--input",
            str(f),
            "--output",
            str(tmp_path / "e"),
            "--tokenizer",
            str(tok_dir),
            "--max-length",
            "8",
            "--template",
            "chatml",
            "--eval-fraction",
            "0",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{f}: row 1: answer 0 cannot fit" in err[0]
    rc = prepare_data.main(
        [
            "--input",
            str(f),
            "--output",
            str(tmp_path / "o"),
            "--tokenizer",
            str(tok_dir),
            "--max-length",
            "8",
            "--template",
            "chatml",
            "--eval-fraction",
            "0",
            "--on-bad-row",
            "skip",
        ]
    )
    assert rc == 2  # nothing left to write; the report still lists every row
    assert "no rows left" in capsys.readouterr().err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["rows_kept"] == 0 and rep["rows_skipped"] == 2 and "cannot fit" in rep["skipped"][0]["reason"]
