"""Nectar prompts per second for one reward-model update: starling_jax's best layout vs PyTorch, in one run.

Work per step: B Nectar-like prompts, K = 7 ranked answers each (ties included). Three implementations update
the same Mistral-shaped reward model (bench/rm_step.py's model A by default) on the same prompts:

  starling_jax   shared-prefix rows (prompt once, its answers after it) packed into rows of L tokens,
                 blockwise attention, Plackett-Luce (Breslow ties) — the real `rm_step.jit_train_step`.
  pairwise       PyTorch `MistralForSequenceClassification`, pair-expanded as trl's RewardTrainer needs: every
                 strictly ordered pair of a prompt's answers (21 without ties) as a chosen and a rejected
                 sequence, in mini-batches of `--pair-batch` pairs padded to their longest; -log σ(r_c - r_r).
  listwise       PyTorch, one row per answer (B·K rows padded to the longest), the same Plackett-Luce loss.

Nectar-like lengths (tokens, Llama-2 chat rendering; log-normal, clipped): prompt median 64 (σ 0.8, 8..512),
answer median 128 (σ 0.7, 4..768), sequence ≤ max_length 1024; ranks 1..7 with ~30% of prompts holding one tie.
`padding_efficiency` = non-padding / processed tokens of starling_jax's layout on 512 prompts in global batches
of 64 (the recipes' batch size), `prefix_token_ratio` = tokens processed with the shared prefix / with
per-answer rows on the same prompts.

    python bench/rm_nectar.py                # model A, 4 prompts per step, 3 timed steps
    python bench/rm_nectar.py --quick        # tiny model, short sequences, 1 step (CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import rm_step as rm_step_bench  # noqa: E402  (shared timing helper and model table)

from starling_jax.data import layout  # noqa: E402

K = 7
LENGTHS = {"prompt": (64, 0.8, 8, 512), "answer": (128, 0.7, 4, 768), "max_length": 1024}
QUICK_LENGTHS = {"prompt": (16, 0.8, 4, 64), "answer": (24, 0.7, 2, 96), "max_length": 192}
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=None,
)


def nectar_like(n: int, seed: int, lengths: dict, vocab: int) -> list[tuple[list[np.ndarray], np.ndarray]]:
    """n prompts: ([K answer sequences = prompt + answer tokens], ranks [K] with ties)."""
    rng = np.random.default_rng(seed)

    def draw(kind, size):
        median, sigma, lo, hi = lengths[kind]
        return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(size))), lo, hi).astype(int)

    out = []
    for _ in range(n):
        p = int(draw("prompt", 1)[0])
        answers = np.minimum(draw("answer", K), lengths["max_length"] - p)
        prompt = rng.integers(1, vocab, size=p).astype(np.int32)
        seqs = [np.concatenate([prompt, rng.integers(1, vocab, size=a).astype(np.int32)]) for a in answers]
        ranks = np.arange(1, K + 1, dtype=np.float32)
        if rng.random() < 0.3:  # one tie: two neighbours share a rank
            t = int(rng.integers(0, K - 1))
            ranks[t + 1 :] -= 1
        out.append((seqs, ranks[rng.permutation(K)]))
    return out


def layout_stats(prompts, row_length: int, batch: int) -> tuple[float, float]:
    """(padding efficiency, prefix token ratio) of shared-prefix packed rows over global batches of `batch`."""
    processed = slots = per_answer = 0
    for s in range(0, len(prompts), batch):
        chunk = [seqs for seqs, _ in prompts[s : s + batch]]
        packed = layout.pack(chunk, K, row_length, layout="shared_prefix", packing=True)
        processed += int(np.sum(packed["segment_ids"] != 0))
        slots += packed["segment_ids"].size
        per_answer += packed["real_tokens"]
    return processed / slots, processed / per_answer


# ---------------------------------------------------------------------------------------------- PyTorch
def torch_model(cfg_kw: dict):
    import torch
    from transformers import MistralConfig, MistralForSequenceClassification

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = MistralConfig(**cfg_kw, num_labels=1, pad_token_id=0, initializer_range=0.02, attn_implementation="sdpa")
    model = MistralForSequenceClassification(cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    return model, opt


def _padded(seqs):
    import torch

    n = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), n), np.int64)
    mask = np.zeros((len(seqs), n), np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return torch.from_numpy(ids), torch.from_numpy(mask), int(mask.sum()), ids.size


def torch_pairwise_step(model, opt, prompts, pair_batch: int) -> dict:
    import torch

    pairs = [(seqs[i], seqs[j]) for seqs, ranks in prompts for i in range(K) for j in range(K) if ranks[i] < ranks[j]]
    opt.zero_grad(set_to_none=True)
    real = processed = 0
    for s in range(0, len(pairs), pair_batch):
        chunk = pairs[s : s + pair_batch]
        ids, mask, r, p = _padded([c for c, _ in chunk] + [r for _, r in chunk])
        real, processed = real + r, processed + p
        rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        n = len(chunk)
        loss = -torch.nn.functional.logsigmoid(rewards[:n] - rewards[n:]).sum() / len(pairs)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return {"pairs": len(pairs), "tokens": processed, "real": real}


def torch_listwise_step(model, opt, prompts) -> dict:
    import torch

    opt.zero_grad(set_to_none=True)
    ids, mask, real, processed = _padded([s for seqs, _ in prompts for s in seqs])
    rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0].view(len(prompts), K)
    ranks = torch.from_numpy(np.stack([r for _, r in prompts]))
    in_denom = ranks[:, None, :] >= ranks[:, :, None]  # Breslow ties, as starling_jax's Plackett-Luce
    lse = torch.logsumexp(torch.where(in_denom, rewards[:, None, :], torch.tensor(-1e30)), dim=-1)
    loss = -(rewards - lse).sum(-1).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return {"tokens": processed, "real": real}


# ---------------------------------------------------------------------------------------------- JAX
def jax_step(cfg_kw: dict, prompts, row_length: int, attention: str):
    import jax

    from starling_jax.model import create
    from starling_jax.model.config import ModelConfig
    from starling_jax.parallel import sharding
    from starling_jax.train import rm_step
    from starling_jax.train.optimizer import OptimConfig, make_optimizer
    from starling_jax.train.state import init_train_state

    cfg = ModelConfig(**cfg_kw, dtype="float32", param_dtype="float32", pad_token_id=0, attention_impl=attention)
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    graphdef, params = create.create_sharded(cfg, "reward", mesh, seed=0)
    _, abstract = create.abstract_model(cfg, "reward")
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-5), total_steps=1000)
    state, shardings = init_train_state(params, sharding.state_shardings(abstract, mesh), tx, mesh, seed=0)
    packed = layout.pack([seqs for seqs, _ in prompts], K, row_length, layout="shared_prefix", packing=True)
    real = packed.pop("real_tokens")
    batch = {
        **packed,
        "ranks": np.stack([r for _, r in prompts]).astype(np.float32),
        "answer_mask": np.ones((len(prompts), K), bool),
    }
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    gbatch = {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()}
    fn = rm_step.jit_train_step(graphdef, tx, schedule, rm_step.LossConfig(), 1, mesh, shardings, batch_sh)
    start = time.perf_counter()
    compiled = fn.lower(state, gbatch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], gbatch)
        jax.block_until_ready(metrics)
        return metrics

    info = {
        "tokens": packed["segment_ids"].size,
        "real": int(np.sum(packed["segment_ids"] != 0)),
        "per_answer_tokens": real,
        "rows": packed["tokens"].shape[0],
        "compile_s": compile_s,
    }
    return step, info


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="A", help="bench/rm_step.py model: A (hidden 256, 4 layers) or B")
    ap.add_argument("--prompts", type=int, default=4, help="Nectar prompts per update")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pair-batch", type=int, default=16, help="PyTorch pairwise: pairs per padded mini-batch")
    ap.add_argument("--attention", default="blockwise", help="starling_jax runtime.attention_impl")
    ap.add_argument("--quick", action="store_true", help="tiny model, short sequences, 1 step (smoke test)")
    args = ap.parse_args(argv)
    lengths = LENGTHS
    cfg_kw = {**rm_step_bench.COMMON, **rm_step_bench.MODELS.get(args.model, {})}
    if args.model not in rm_step_bench.MODELS:
        ap.error(f"--model: unknown model {args.model!r}; choose from {sorted(rm_step_bench.MODELS)}")
    if args.quick:
        lengths, cfg_kw = QUICK_LENGTHS, TINY
        args.steps, args.warmup, args.prompts, args.pair_batch = 1, 0, 2, 64
    row_length = lengths["max_length"]

    import jax
    import torch

    load = os.getloadavg()
    prompts = nectar_like(args.prompts, 0, lengths, cfg_kw["vocab_size"])
    sample = nectar_like(128 if args.quick else 512, 1, lengths, cfg_kw["vocab_size"])
    efficiency, prefix_ratio = layout_stats(sample, row_length, 64)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f}; jax {jax.__version__}, torch {torch.__version__}"
    )
    print(
        f"# {args.prompts} prompts x K={K} per update, rows of {row_length} tokens; median of {args.steps} "
        f"steps after {args.warmup} warm-up; lengths {lengths}"
    )

    rows = []
    step, info = jax_step(cfg_kw, prompts, row_length, args.attention)
    med, _ = rm_step_bench.timed(step, args.steps, args.warmup)
    rows.append(dict(impl=f"starling_jax shared-prefix packed ({args.attention})", step_s=med, **info))
    model, opt = torch_model(cfg_kw)
    holder = {}
    med, _ = rm_step_bench.timed(
        lambda: holder.update(torch_listwise_step(model, opt, prompts)), args.steps, args.warmup
    )
    rows.append(dict(impl="PyTorch listwise (per-answer rows)", step_s=med, **holder))
    med, _ = rm_step_bench.timed(
        lambda: holder.update(torch_pairwise_step(model, opt, prompts, args.pair_batch)), args.steps, args.warmup
    )
    rows.append(dict(impl="PyTorch pairwise (pair-expanded, trl-style)", step_s=med, **holder))

    print("\n| implementation | prompts/s | step s | tokens processed | non-padding | vs pairwise | vs listwise |")
    print("|---|---|---|---|---|---|---|")
    pair_s, list_s = rows[2]["step_s"], rows[1]["step_s"]
    for r in rows:
        r["prompts_per_s"] = args.prompts / r["step_s"]
        print(
            f"| {r['impl']} | {r['prompts_per_s']:.3f} | {r['step_s']:.2f} | {r['tokens']} | "
            f"{r['real'] / r['tokens']:.2f} | {pair_s / r['step_s']:.2f} | {list_s / r['step_s']:.2f} |"
        )
    print(
        f"\nshared-prefix packed layout on {len(sample)} prompts (global batches of 64): padding efficiency "
        f"{efficiency:.3f}, prefix token ratio {prefix_ratio:.3f}"
    )
    summary = {
        "bench": "rm_nectar",
        "status": "ok",
        "speedup": round(pair_s / rows[0]["step_s"], 3),
        "speedup_vs_listwise": round(list_s / rows[0]["step_s"], 3),
        "padding_efficiency": round(efficiency, 4),
        "prefix_token_ratio": round(prefix_ratio, 4),
        "prompts_per_s": round(rows[0]["prompts_per_s"], 4),
        "prompts": args.prompts,
        "k": K,
        "row_length": row_length,
        "model": "tiny" if args.quick else args.model,
        "attention": args.attention,
        "load_at_start": load[0],
        "quick": args.quick,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
