"""Benchmark of the tf.data pipeline: examples/s, tokens/s and padding efficiency on Nectar-like lengths.

    python bench/data_pipeline.py [--rows 4000] [--batches 100] [--global-batch 32]

Synthetic examples with a Nectar-like length distribution (log-normal sequence lengths, median ~450 tokens,
capped at 2048, 7 answers) go through `RankingPipeline` (bucketed vs. unbucketed). Prints a small table and a
final one-line JSON summary.
"""

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from starling_jax.data.pipeline import InMemorySource, RankingPipeline  # noqa: E402
from starling_jax.data.tokenize import TokenizedRanking  # noqa: E402


def nectar_like(rows, seed=0, k=7, max_length=2048):
    rng = np.random.default_rng(seed)
    out = []
    for r in range(rows):
        prompt = int(np.clip(rng.lognormal(4.5, 0.9), 8, 1500))
        ans = np.clip(rng.lognormal(5.6, 0.7, size=k), 1, None).astype(int)
        lens = np.minimum(prompt + ans + 12, max_length)
        out.append(
            TokenizedRanking(
                row=r + 1,
                tokens=[np.ones(n, np.int32) for n in lens],
                answer_start=np.full(k, min(prompt, max_length - 2), np.int32),
                answer_lengths=(lens - prompt).clip(0).astype(np.int32),
                reward_index=(lens - 1).astype(np.int32),
                ranks=rng.permutation(k).astype(np.float32) + 1,
            )
        )
    return out


def run(src, bucket_window, args):
    p = RankingPipeline(
        src,
        global_batch_size=args.global_batch,
        num_answers=7,
        max_length=2048,
        seed=0,
        bucket_window=bucket_window,
        process_index=0,
        process_count=1,
    )
    next(p)  # warm up
    t0 = time.perf_counter()
    ex = real = total = 0
    for _ in range(args.batches):
        b = next(p)
        ex += int((b["row"] >= 0).sum())
        real += int(b["segment_ids"].sum())
        total += b["tokens"].size
    dt = time.perf_counter() - t0
    p.close()
    return {
        "bucket_window": bucket_window,
        "examples_per_s": round(ex / dt, 1),
        "tokens_per_s": round(total / dt),
        "real_tokens_per_s": round(real / dt),
        "padding_efficiency": round(real / total, 3),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--global-batch", type=int, default=32)
    args = ap.parse_args()
    src = InMemorySource(nectar_like(args.rows))
    rows = [run(src, w, args) for w in (32, 1)]
    print(f"{'bucket_window':>13} {'examples/s':>11} {'tokens/s (padded)':>18} {'real tokens/s':>14} {'pad eff':>8}")
    for r in rows:
        print(
            f"{r['bucket_window']:>13} {r['examples_per_s']:>11} {r['tokens_per_s']:>18} "
            f"{r['real_tokens_per_s']:>14} {r['padding_efficiency']:>8}"
        )
    print(json.dumps({"results": rows, "global_batch": args.global_batch, "num_answers": 7}))


if __name__ == "__main__":
    main()
