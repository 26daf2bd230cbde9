import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from starling_jax.data.pipeline import InMemorySource, RankingPipeline, batch_plan, select_answers
from starling_jax.data.synthetic import generate, write_jsonl
from starling_jax.data.tokenize import TokenizedRanking

HERE = Path(__file__).parent
WORKER = HERE / "_pipeline_worker.py"


def fake(row, lens, ranks):
    return TokenizedRanking(
        row=row,
        tokens=[np.arange(1, n + 1, dtype=np.int32) + 100 * j for j, n in enumerate(lens)],
        answer_start=np.zeros(len(lens), np.int32),
        answer_lengths=np.asarray(lens, np.int32) - 1,
        reward_index=np.asarray(lens, np.int32) - 1,
        ranks=np.asarray(ranks, np.float32),
    )


@pytest.fixture(scope="module")
def synth_file(tmp_path_factory):
    return write_jsonl(generate(61, seed=5), tmp_path_factory.mktemp("s") / "synth.jsonl")


def test_batch_contract():
    src = InMemorySource(
        [
            fake(1, [5, 130, 7], [2, 1, 2]),
            fake(2, [3, 4], [1, 2]),
            fake(3, [9, 8, 7, 6, 5, 4, 3, 2, 1], [9, 8, 7, 6, 5, 4, 3, 2, 1]),
        ]
    )
    p = RankingPipeline(
        src, global_batch_size=4, num_answers=7, max_length=512, mode="eval", process_index=0, process_count=1
    )
    (b,) = list(p)
    assert b["tokens"].shape == (4, 7, 256) and b["tokens"].dtype == np.int32
    assert b["ranks"].dtype == np.float32 and b["answer_mask"].dtype == bool
    assert b["row"].tolist() == [1, 3, 2, -1]  # eval: longest first (row 1 has a 130-token answer, row 3 9, row 2 4)
    # row 1: best-first, ties stable: answer 1 (rank 1), then answers 0 and 2 (rank 2)
    assert b["ranks"][0, :3].tolist() == [1, 2, 2] and b["answer_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert b["tokens"][0, 0, :130].tolist() == list(range(101, 231)) and b["tokens"][0, 0, 130:].sum() == 0
    assert b["reward_index"][0, :3].tolist() == [129, 4, 6]
    assert b["positions"][0, 1, :6].tolist() == [0, 1, 2, 3, 4, 0]
    assert b["segment_ids"][0, 1, :6].tolist() == [1, 1, 1, 1, 1, 0]
    assert b["answer_lengths"][0, :3].tolist() == [129, 4, 6]
    # row 3 has 9 answers: the 7 best are kept, best-first
    assert b["ranks"][1].tolist() == [1, 2, 3, 4, 5, 6, 7] and b["answer_mask"][1].all()
    # padding row contributes nothing
    assert not b["answer_mask"][3].any() and b["segment_ids"][3].sum() == 0
    assert select_answers([3, 1, 2, 1], 2) == [1, 3]


def test_plan_covers_split_and_buckets():
    lengths = np.random.default_rng(0).integers(10, 1000, size=1003)
    plan = batch_plan(lengths, 16, seed=1, epoch=0, shuffle=True, bucket_window=8)
    real = plan[plan >= 0]
    assert sorted(real.tolist()) == list(range(1003)) and plan.shape == (63, 16)
    assert not np.array_equal(plan, batch_plan(lengths, 16, seed=1, epoch=1, shuffle=True))
    assert np.array_equal(plan, batch_plan(lengths, 16, seed=1, epoch=0, shuffle=True, bucket_window=8))

    # bucketing: much less padding than unbucketed batches
    def waste(pl):
        return sum(lengths[r[r >= 0]].max() * (r >= 0).sum() - lengths[r[r >= 0]].sum() for r in pl)

    assert waste(plan) < 0.3 * waste(batch_plan(lengths, 16, seed=1, epoch=0, shuffle=True, bucket_window=1))


def test_train_iterates_epochs_and_pads_to_128(synth_file):
    from starling_jax.data.pipeline import open_source

    p = RankingPipeline(
        open_source(synth_file, max_length=128), global_batch_size=8, seed=0, process_index=0, process_count=1
    )
    assert p.num_batches_per_epoch == 8
    seen = []
    for _ in range(8):
        b = next(p)
        assert b["tokens"].shape[2] == 128 and b["tokens"].shape[:2] == (8, 7)
        seen += [r for r in b["row"].tolist() if r >= 0]
    assert sorted(seen) == list(range(1, 62))
    assert p.state()["epoch"] == 1 and p.state()["batch"] == 0
    ev = RankingPipeline(
        open_source(synth_file, max_length=128), global_batch_size=8, mode="eval", process_index=0, process_count=1
    )
    assert len(list(ev)) == 8 and len(list(ev)) == 8  # one pass, restartable


def test_eval_plan_is_longest_first_and_pads_less_than_file_order(synth_file):
    """The eval pass is length-bucketed: examples sorted longest first (ties in file order), each batch padded
    to its own longest sequence; every row exactly once."""
    from starling_jax.data.pipeline import open_source

    ev = RankingPipeline(
        open_source(synth_file, max_length=512),
        global_batch_size=8,
        mode="eval",
        pad_to_multiple=8,
        process_index=0,
        process_count=1,
    )
    longest = [int(ev.lengths[g[g >= 0]].max()) for g in ev.plan(0)]
    assert longest == sorted(longest, reverse=True) and longest[0] > longest[-1]
    order = [int(i) for i in ev.plan(0).ravel() if i >= 0]
    assert order == sorted(range(len(ev.lengths)), key=lambda i: (-int(ev.lengths[i]), i))
    batches = list(ev)
    assert sorted(r for b in batches for r in b["row"].tolist() if r >= 0) == list(range(1, 62))
    padded = sum(b["tokens"].shape[0] * b["tokens"].shape[2] for b in batches)
    in_file_order = batch_plan(ev.lengths, 8, seed=0, epoch=0, shuffle=False)
    padded_file_order = sum(8 * (-(-int(ev.lengths[g[g >= 0]].max()) // 8) * 8) for g in in_file_order)
    assert padded <= padded_file_order


def test_loaders_serve_identical_batches_and_auto_picks_tf_data_only_for_prepared_data(synth_file):
    """tf.data and the thread read-ahead only decide how batches are read ahead: the same batches, in the same
    order, across an epoch boundary, after a restore in the middle of an epoch, and in an eval pass; `auto` reads
    a file with threads (no TensorFlow import) and a prepared TFDS dataset with tf.data."""
    from starling_jax.data.pipeline import DataError, TfdsSource, open_source, resolve_loader

    src = open_source(synth_file, max_length=128)

    def pipeline(loader, **kw):
        kw = {"global_batch_size": 8, "seed": 3, "bucket_window": 2, "process_index": 0, "process_count": 1} | kw
        return RankingPipeline(src, loader=loader, prefetch=3, num_parallel=2, **kw)

    def take(p, n):
        return [next(p) for _ in range(n)]

    def same(a, b):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)

    tf_data, threads = pipeline("tf_data"), pipeline("threads")
    assert (tf_data.loader, threads.loader, pipeline("auto").loader) == ("tf_data", "threads", "threads")
    reference = take(tf_data, 19)  # 8 batches per epoch: into the third epoch
    same(take(threads, 19), reference)
    assert len({b["row"].tobytes() for b in reference[:8]}) == 8  # different batches, not one repeated
    # a restore in the middle of an epoch, while the read-ahead holds later batches
    threads.restore({"epoch": 0, "batch": 5})
    same(take(threads, 6), reference[5:11])
    same(list(pipeline("threads", mode="eval")), list(pipeline("tf_data", mode="eval")))
    threads.close()
    same(take(threads, 2), reference[11:13])  # closing keeps the position

    assert resolve_loader("auto", TfdsSource.__new__(TfdsSource)) == "tf_data"
    with pytest.raises(DataError, match="data.loader='grain'"):
        pipeline("grain")


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run(
        [sys.executable, str(WORKER), *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_resume_in_fresh_process(synth_file, tmp_path):
    state = tmp_path / "state.json"
    _run("save", synth_file, state, 11)  # crosses an epoch boundary (8 batches per epoch)
    assert json.loads(state.read_text())["epoch"] == 1
    resumed = [ln for ln in _run("load", synth_file, state).splitlines() if ln.startswith("HASH")]
    straight = [ln for ln in _run("straight", synth_file, state, 11).splitlines() if ln.startswith("HASH")]
    assert resumed == straight and resumed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_disjoint_and_complete(synth_file, tmp_path):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "multi", str(synth_file), str(tmp_path / f"p{i}.json"), str(i), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        for i in range(2)
    ]
    for pr in procs:
        _, err = pr.communicate(timeout=240)
        assert pr.returncode == 0, err[-3000:]
    res = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    a, b = set(res[0]["rows"]), set(res[1]["rows"])
    assert not a & b
    assert sorted(a | b) == list(range(1, 62))
    assert res[0]["batches"] == res[1]["batches"] == 8
    assert res[0]["global_shape"][0] == 8
    assert res[0]["global_equal"] and res[1]["global_equal"]


def test_rows_that_do_not_fit_follow_on_bad_row(synth_file, monkeypatch):
    """A row whose answers cannot fit max_length is a bad row: `skip` drops and reports it, `error` stops on it."""
    import starling_jax.data.tokenize as tokenize
    from starling_jax.data.pipeline import open_source
    from starling_jax.errors import DataError

    real = tokenize.tokenize_ranking

    def tokenize_some(r, *a, **k):
        if r.row in (3, 5):
            raise tokenize.RowDoesNotFit("answer 0 cannot fit in max_length 128")
        return real(r, *a, **k)

    import starling_jax.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "tokenize_ranking", tokenize_some)
    src = open_source(synth_file, max_length=128, on_bad_row="skip")
    assert len(src) == 59 and sorted(src[i]["row"] for i in range(len(src))) == [
        r for r in range(1, 62) if r not in (3, 5)
    ]
    assert src.report.rows_read == 61 and src.report.rows_kept == 59 and src.report.rows_skipped == 2
    assert src.report.skipped == [
        {"row": 3, "reason": "answer 0 cannot fit in max_length 128"},
        {"row": 5, "reason": "answer 0 cannot fit in max_length 128"},
    ]
    with pytest.raises(DataError, match=r"synth.jsonl: row 3: answer 0 cannot fit"):
        open_source(synth_file, max_length=128, on_bad_row="error")
