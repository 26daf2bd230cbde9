"""Rollout benchmark: the starling_jax sampler vs transformers' `generate` on the same weights, in one run.

A random Mistral-shaped causal LM (vocab 32000, hidden 256, FFN 768, 4 layers, 8 heads / 4 KV heads, window 4096,
fp32, transformers' own initialization) is saved once as an HF folder; transformers (`MistralForCausalLM`, sdpa,
`torch.set_num_threads(2)`) and starling_jax (`hf_io.load_hf` + `sample.engine.make_sampler`, 1 device) load
the same file. Batch 16 prompts × 64 random tokens, 128 new tokens, no EOS (every row generates all 128), in two
modes: greedy, and top-p 0.9 sampling at temperature 1. Timings are medians of `--reps` full rollouts after one
warm-up (JAX compile time excluded, reported separately); the greedy tokens of the two are compared.

    python bench/rollout.py            # the shape above, 3 timed rollouts per row
    python bench/rollout.py --quick    # greedy only, batch 2 × 8 tokens, 8 new tokens, 1 rollout (CI smoke test)
    python bench/rollout.py --bandwidth          # on a GPU: decode bandwidth of a 1.1B Mistral shape, batch 1/16/64
    python bench/rollout.py --bandwidth --quick  # the same code path on a tiny shape (CI smoke test)

`--bandwidth` times greedy decode of a random bf16 model built in memory (no transformers side): bytes read per
decode step = all parameter bytes (every weight is read once per step, the LM head included) + the KV cache
bytes read (keys and values of every layer, for the positions a step reads on average), over the step time,
against the chip's HBM peak (H100 3.35 TB/s, H200 4.8 TB/s; `--peak-gbs` sets it elsewhere). Its JSON line has
`hbm_fraction_batch1` and per-batch rows; `speedup` there is the batch-64 over the batch-1 token throughput.

The last printed line is JSON with `speedup`: starling_jax's new tokens/s over transformers', over both modes
(total transformers time / total starling_jax time), plus the per-mode ratios (`speedup_top_p` is null with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

MODEL = dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    sliding_window=4096,
    max_position_embeddings=4096,
)
MODES = {"greedy": dict(temperature=0.0, top_p=1.0), "top_p": dict(temperature=1.0, top_p=0.9)}


def make_folder(folder: Path) -> Path:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(**MODEL, bos_token_id=1, eos_token_id=None, pad_token_id=0, initializer_range=0.02)
    MistralForCausalLM(cfg).float().eval().save_pretrained(folder, safe_serialization=True)
    return folder


def print_table(headers: list[str], cells: list[list]) -> None:
    """A markdown table, after a blank line."""
    print("\n| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in cells:
        print("| " + " | ".join(str(c) for c in row) + " |")


def timed(fn, reps: int) -> tuple[float, object]:
    out = fn()  # warm-up (and compile)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def torch_rollout(folder: Path, prompts: np.ndarray, new: int, mode: str, reps: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.from_numpy(prompts.astype(np.int64))
    kwargs = (
        dict(do_sample=False)
        if mode == "greedy"
        else dict(do_sample=True, top_p=MODES[mode]["top_p"], temperature=1.0, top_k=0)
    )

    def run():
        torch.manual_seed(0)
        with torch.no_grad():
            return model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=0,
                eos_token_id=None,
                **kwargs,
            )

    seconds, out = timed(run, reps)
    return seconds, out[:, prompts.shape[1] :].numpy()


def jax_rollout(folder: Path, prompts: np.ndarray, new: int, mode: str, reps: int, dtype: str = "float32"):
    import jax
    import jax.numpy as jnp

    from starling_jax.model import hf_io
    from starling_jax.parallel.sharding import MeshConfig, make_mesh
    from starling_jax.sample.engine import SamplingConfig, make_sampler

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    _, graphdef, params = hf_io.load_hf(folder, "causal_lm", mesh, dtype=dtype)
    cfg = SamplingConfig(max_new_tokens=new, **MODES[mode])
    fn = make_sampler(graphdef, cfg)
    n = prompts.shape[0]
    args = (
        params,
        jnp.asarray(prompts, jnp.int32),
        jnp.full((n,), prompts.shape[1], jnp.int32),
        jnp.arange(n),
        jax.random.key(0),
    )
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    seconds, out = timed(lambda: jax.device_get(compiled(*args)), reps)
    assert (out.lengths == new).all()
    return seconds, np.asarray(out.tokens), compile_s


# A TinyLlama-1.1B-shaped Mistral (GQA 32/4, 22 layers), the 1-2B shape of the bandwidth measurement.
BANDWIDTH_MODEL = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    sliding_window=4096,
    max_position_embeddings=4096,
)
TINY_BANDWIDTH_MODEL = dict(
    BANDWIDTH_MODEL,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
HBM_PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # datasheet, per chip


def decode_bytes_per_step(
    model: dict, params_bytes: int, batch: int, prompt: int, new: int, cache_itemsize: int
) -> float:
    """HBM bytes a greedy decode step reads, on average over the rollout: every parameter once, plus the keys
    and values of every layer at the positions the step attends to (the sampler reads the whole preallocated
    cache row and masks it: S = prompt + new - 1 positions)."""
    head_dim = model["hidden_size"] // model["num_attention_heads"]
    s = prompt + new - 1
    kv = 2 * model["num_hidden_layers"] * batch * model["num_key_value_heads"] * s * head_dim * cache_itemsize
    return float(params_bytes + kv)


def bandwidth_rows(quick: bool, peak_gbs: float | None, reps: int) -> tuple[list[dict], dict]:
    import jax
    import jax.numpy as jnp

    from starling_jax.model import create
    from starling_jax.model.config import ModelConfig
    from starling_jax.parallel.sharding import MeshConfig, make_mesh
    from starling_jax.sample.engine import SamplingConfig, make_sampler

    shape = TINY_BANDWIDTH_MODEL if quick else BANDWIDTH_MODEL
    prompt, new = (8, 8) if quick else (64, 128)
    batches = (1, 2) if quick else (1, 16, 64)
    cfg = ModelConfig(model_type="mistral", **shape, dtype="bfloat16", param_dtype="bfloat16", pad_token_id=0)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    graphdef, params = create.create_sharded(cfg, "causal_lm", mesh, seed=0)
    params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    kind = jax.devices()[0].device_kind
    peak = peak_gbs or next((v for k, v in HBM_PEAK_GBS.items() if k in kind), None)
    fn = make_sampler(graphdef, SamplingConfig(max_new_tokens=new, temperature=0.0), None)
    rows = []
    for b in batches:
        prompts = jnp.asarray(np.random.default_rng(b).integers(1, shape["vocab_size"], (b, prompt)), jnp.int32)
        args = (params, prompts, jnp.full((b,), prompt, jnp.int32), jnp.arange(b), jax.random.key(0))
        compiled = fn.lower(*args).compile()
        seconds, out = timed(lambda: jax.block_until_ready(compiled(*args)), reps)
        step_s = seconds / new  # the prefill is one of `new` forwards; at prompt 64 it is a small share
        nbytes = decode_bytes_per_step(shape, params_bytes, b, prompt, new, 2)
        gbs = nbytes / step_s / 1e9
        rows.append(
            dict(
                batch=b,
                step_ms=1e3 * step_s,
                tok_s=b * new / seconds,
                bytes_per_step=int(nbytes),
                gb_per_step=nbytes / 1e9,
                gbs=gbs,
                hbm_fraction=gbs / peak if peak else None,
            )
        )
    info = dict(
        device=kind,
        params=int(sum(x.size for x in jax.tree.leaves(params))),
        params_gb=params_bytes / 1e9,
        peak_gbs=peak,
        prompt=prompt,
        new_tokens=new,
        shape="tiny" if quick else "1.1B",
    )
    return rows, info


def bandwidth_main(args) -> int:
    rows, info = bandwidth_rows(args.quick, args.peak_gbs, args.reps)
    print(
        f"# {info['device']}: random bf16 Mistral ({info['shape']}, {info['params'] / 1e9:.3f} B params, "
        f"{info['params_gb']:.2f} GB), prompt {info['prompt']}, {info['new_tokens']} new tokens, greedy, median of "
        f"{args.reps}; HBM peak {info['peak_gbs'] or 'unknown'} GB/s"
    )
    print_table(
        ["batch", "ms per decode step", "new tokens/s", "GB read per step", "GB/s", "fraction of HBM peak"],
        [
            [
                r["batch"],
                f"{r['step_ms']:.2f}",
                f"{r['tok_s']:.0f}",
                f"{r['gb_per_step']:.3f}",
                f"{r['gbs']:.0f}",
                f"{r['hbm_fraction']:.1%}" if r["hbm_fraction"] is not None else "–",
            ]
            for r in rows
        ],
    )
    summary = {
        "status": "completed",
        "benchmark": "rollout_bandwidth",
        "quick": args.quick,
        **info,
        "hbm_fraction_batch1": rows[0]["hbm_fraction"],
        "speedup": round(rows[-1]["tok_s"] / rows[0]["tok_s"], 3),
        "rows": rows,
    }
    print(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="greedy only, batch 2 × 8, 8 new tokens, 1 rollout")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="also starling_jax with bf16 compute (same fp32 weights)")
    ap.add_argument(
        "--bandwidth",
        action="store_true",
        help="decode bandwidth vs the HBM peak (a GPU measurement; 1.1B shape, batch 1/16/64)",
    )
    ap.add_argument("--peak-gbs", type=float, default=None, help="HBM peak in GB/s (default: from the device kind)")
    args = ap.parse_args(argv)
    if args.bandwidth:
        if args.quick:
            args.reps = 1
        return bandwidth_main(args)
    modes = ["greedy"] if args.quick else list(MODES)
    if args.quick:
        args.batch, args.prompt, args.new, args.reps = 2, 8, 8, 1
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    load = os.getloadavg()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f}"
    )
    print(
        f"# random Mistral {MODEL}, fp32; batch {args.batch} x prompt {args.prompt}, {args.new} new tokens, "
        f"median of {args.reps}"
    )
    prompts = np.random.default_rng(0).integers(1, MODEL["vocab_size"], (args.batch, args.prompt)).astype(np.int32)
    new_tokens = args.batch * args.new
    rows, totals = [], {"torch": 0.0, "jax": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp) / "mistral")
        greedy_tokens = {}
        for mode in modes:
            t_s, t_tokens = torch_rollout(folder, prompts, args.new, mode, args.reps)
            j_s, j_tokens, compile_s = jax_rollout(folder, prompts, args.new, mode, args.reps)
            totals["torch"] += t_s
            totals["jax"] += j_s
            if mode == "greedy":
                greedy_tokens = {"torch": t_tokens, "jax": j_tokens}
            rows.append(
                dict(
                    mode=mode,
                    impl="transformers generate (PyTorch fp32, sdpa)",
                    seconds=t_s,
                    tok_s=new_tokens / t_s,
                    speedup=1.0,
                    compile_s=None,
                )
            )
            rows.append(
                dict(
                    mode=mode,
                    impl="starling_jax sampler (fp32)",
                    seconds=j_s,
                    tok_s=new_tokens / j_s,
                    speedup=t_s / j_s,
                    compile_s=compile_s,
                )
            )
            if args.bf16:
                b_s, _, b_compile = jax_rollout(folder, prompts, args.new, mode, args.reps, dtype="bfloat16")
                rows.append(
                    dict(
                        mode=mode,
                        impl="starling_jax sampler (bf16 compute)",
                        seconds=b_s,
                        tok_s=new_tokens / b_s,
                        speedup=t_s / b_s,
                        compile_s=b_compile,
                    )
                )
    same = float(np.mean(np.all(greedy_tokens["torch"] == greedy_tokens["jax"], axis=1)))

    print_table(
        ["mode", "implementation", "rollout s", "new tokens/s", "ms per decode step", "vs transformers", "compile s"],
        [
            [
                r["mode"],
                r["impl"],
                f"{r['seconds']:.3f}",
                f"{r['tok_s']:.0f}",
                f"{1000 * r['seconds'] / args.new:.2f}",
                f"{r['speedup']:.2f}",
                f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "–",
            ]
            for r in rows
        ],
    )
    print(f"\ngreedy rows with identical tokens (starling_jax vs transformers): {same:.0%}")
    by_mode = {r["mode"]: r["speedup"] for r in rows if r["impl"].startswith("starling_jax sampler (fp32")}
    summary = {
        "status": "completed",
        "benchmark": "rollout",
        "quick": args.quick,
        "batch": args.batch,
        "prompt": args.prompt,
        "new_tokens": args.new,
        "speedup": round(totals["torch"] / totals["jax"], 3),
        "speedup_greedy": round(by_mode["greedy"], 3),
        "speedup_top_p": round(by_mode["top_p"], 3) if "top_p" in by_mode else None,
        "greedy_rows_identical": same,
        "load_avg_1m": round(load[0], 2),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
