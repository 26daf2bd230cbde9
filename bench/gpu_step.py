"""GPU check, one run: starling_jax's reward model on a CUDA GPU against transformers (PyTorch) on the same GPU.

1. Parity: a random tiny Mistral reward model (GQA, sliding window shorter than the sequence, right padding) is
   exported with `hf_io.save_hf`, loaded by `AutoModelForSequenceClassification`, and both score the same tokens
   on the GPU in fp32 (TF32 off on both sides; JAX at `highest` and at its default matmul precision).
2. Train step: a Mistral-7B-wide model cut to a few layers (hidden 4096, FFN 14336, 32/8 heads, 32k vocab) with
   fp32 master weights and bf16 compute, K-wise Plackett-Luce loss, AdamW, clip 1.0. starling_jax's real
   `rm_step.jit_train_step` vs PyTorch (`torch.autocast` bf16, sdpa attention, fused AdamW), same batch.
   `--variants` picks ATTENTION_IMPL:REMAT pairs (einsum | fused | cudnn; see ModelConfig.attention_impl).
   MFU = model FLOPs (`ModelConfig.flops_per_token`, 6·N + attention; remat recompute not counted) / step time /
   the chip's dense bf16 peak.

    python bench/gpu_step.py [--layers 4] [--prompts 2] [--length 1024] [--steps 10]

Prints a table and, last, one JSON line. Needs jax with CUDA, torch with CUDA, transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import rm_step as rm_step_bench  # noqa: E402  (bench/rm_step.py: shared timing helper)

DEVICE = "cuda"  # torch's device; main() falls back to "cpu" when torch has no CUDA (smoke runs)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per chip (datasheet)


def timed(fn, steps: int, warmup: int = 2) -> float:
    """Median seconds of `steps` calls after `warmup` (the same timing as bench/rm_step.py)."""
    return rm_step_bench.timed(fn, steps, warmup)[0]


def kwise_batch(rng, prompts, answers, length, vocab, pad_to=None):
    """Right-padded K-wise batch: lengths between length/2 and length (pad_to=None: all full length)."""
    shape = (prompts, answers, length)
    lengths = (
        np.full((prompts, answers), length)
        if pad_to is None
        else rng.integers(length // 2, length + 1, size=(prompts, answers))
    )
    real = np.arange(length)[None, None, :] < lengths[..., None]
    tokens = np.where(real, rng.integers(1, vocab, size=shape), 0).astype(np.int32)
    return {
        "tokens": tokens,
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), shape).copy(),
        "segment_ids": real.astype(np.int32),
        "reward_index": (lengths - 1).astype(np.int32),
        "ranks": np.stack([rng.permutation(answers) + 1 for _ in range(prompts)]).astype(np.float32),
        "answer_mask": np.ones((prompts, answers), bool),
    }


def parity(rows: list) -> dict:
    import jax
    import torch
    from transformers import AutoModelForSequenceClassification

    from starling_jax.model import create, hf_io
    from starling_jax.model.config import ModelConfig
    from starling_jax.parallel import sharding
    from starling_jax.train import rm_step

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = ModelConfig(
        model_type="mistral",
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        sliding_window=24,
        max_position_embeddings=256,
        pad_token_id=0,
        initializer_range=0.05,
    )
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    graphdef, params = create.create_sharded(cfg, "reward", mesh, seed=1)
    batch = kwise_batch(np.random.default_rng(0), 3, 4, 64, cfg.vocab_size, pad_to=True)
    folder = Path(tempfile.mkdtemp()) / "hf"
    hf_io.save_hf(folder, cfg, params, "reward")
    tm = (
        AutoModelForSequenceClassification.from_pretrained(
            str(folder), dtype=torch.float32, attn_implementation="eager"
        )
        .to(DEVICE)
        .eval()
    )
    toks = torch.tensor(batch["tokens"].reshape(-1, 64), dtype=torch.long, device=DEVICE)
    with torch.no_grad():
        ref = tm(toks, attention_mask=(toks != 0).long()).logits[:, 0].double().cpu().numpy().reshape(3, 4)
    out = {}
    for precision in ("highest", "default"):
        with jax.default_matmul_precision(precision):
            fn = jax.jit(lambda p, b: rm_step.eval_rewards(p, b, graphdef=graphdef, mesh=mesh))
            ours = np.asarray(jax.device_get(fn(params, batch)), np.float64)
        diff = float(np.max(np.abs(ours - ref)))
        out[precision] = diff
        rows.append(
            (
                "parity",
                f"max |reward diff| vs transformers, JAX precision={precision}",
                f"{diff:.2e}",
                "fp32, TF32 off in torch",
            )
        )
    # the fused attention path: fp32 (XLA kernel) vs transformers, bf16 (cuDNN kernel) vs the bf16 einsum path
    from flax import nnx

    from starling_jax.model.heads import build_model

    def rewards_with(**changes):
        g = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg.replace(**changes), "reward")))
        with jax.default_matmul_precision("highest"):
            return np.asarray(
                jax.device_get(jax.jit(lambda p, b: rm_step.eval_rewards(p, b, graphdef=g, mesh=mesh))(params, batch)),
                np.float64,
            )

    out["fused_fp32"] = float(np.max(np.abs(rewards_with(attention_impl="fused") - ref)))
    bf16_einsum = rewards_with(dtype="bfloat16")
    bf16_fused = rewards_with(dtype="bfloat16", attention_impl="fused")
    out["fused_bf16_vs_einsum_bf16"] = float(np.max(np.abs(bf16_fused - bf16_einsum)))
    out["einsum_bf16_vs_fp32_ref"] = float(np.max(np.abs(bf16_einsum - ref)))
    rows.append(("parity", "fused attention fp32 vs transformers", f"{out['fused_fp32']:.2e}", "XLA kernel"))
    if jax.default_backend() == "gpu":  # the cuDNN flash kernel (bf16 only)
        out["cudnn_bf16_vs_einsum_bf16"] = float(
            np.max(np.abs(rewards_with(dtype="bfloat16", attention_impl="cudnn") - bf16_einsum))
        )
        rows.append(("parity", "cudnn bf16 vs einsum bf16", f"{out['cudnn_bf16_vs_einsum_bf16']:.2e}", "cuDNN"))
    rows.append(
        (
            "parity",
            "fused bf16 vs einsum bf16",
            f"{out['fused_bf16_vs_einsum_bf16']:.2e}",
            f"einsum bf16 vs fp32 reference: {out['einsum_bf16_vs_fp32_ref']:.2e}",
        )
    )
    return out


def jax_step(cfg, batch, steps) -> tuple[float, float]:
    import jax

    from starling_jax.model import create
    from starling_jax.parallel import sharding
    from starling_jax.train import rm_step
    from starling_jax.train.optimizer import OptimConfig, make_optimizer
    from starling_jax.train.state import init_train_state

    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    graphdef, params = create.create_sharded(cfg, "reward", mesh, seed=0)
    _, abstract = create.abstract_model(cfg, "reward")
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-5), total_steps=1000)
    state, shardings = init_train_state(params, sharding.state_shardings(abstract, mesh), tx, mesh, seed=0)
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    gbatch = {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()}
    fn = rm_step.jit_train_step(graphdef, tx, schedule, rm_step.LossConfig(), 1, mesh, shardings, batch_sh)
    t = time.perf_counter()
    compiled = fn.lower(state, gbatch).compile()
    compile_s = time.perf_counter() - t
    hlo = compiled.as_text() or ""
    print(
        f"  {cfg.attention_impl}/{cfg.remat_policy}: cuDNN fused attention in the compiled step: "
        f"{'cudnn' in hlo.lower() and 'fmha' in hlo.lower()}",
        flush=True,
    )
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], gbatch)
        jax.block_until_ready(metrics)
        return metrics

    med = timed(step, steps)
    assert bool(jax.device_get(step())["finite"])
    del holder, state, params
    return med, compile_s


def torch_step(cfg, batch, steps) -> float:
    import torch
    from transformers import MistralConfig, MistralForSequenceClassification

    hf = MistralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        sliding_window=None,
        num_labels=1,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    model = MistralForSequenceClassification(hf).to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=DEVICE == "cuda")
    p, k, length = batch["tokens"].shape
    toks = torch.tensor(batch["tokens"].reshape(p * k, length), dtype=torch.long, device=DEVICE)
    order = torch.tensor(np.argsort(batch["ranks"], axis=1), device=DEVICE)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            rewards = model(toks).logits.float().reshape(p, k)
        r = torch.gather(rewards, 1, order)  # best first
        tail_lse = torch.logcumsumexp(r.flip(1), 1).flip(1)
        loss = (tail_lse - r).sum(1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    med = timed(step, steps)
    del model, opt
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return med


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument(
        "--variants",
        default="einsum:none,einsum:full,fused:none,fused:full",
        help="comma-separated ATTENTION_IMPL:REMAT_POLICY pairs to time",
    )
    ap.add_argument("--tiny", action="store_true", help="a narrow model (smoke run of this script on a CPU)")
    a = ap.parse_args(argv)

    import torch
    import transformers

    from starling_jax.model.config import ModelConfig

    global DEVICE
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    width = (
        dict(hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=4)
        if a.tiny
        else dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    )
    cfg_kw = dict(
        model_type="mistral",
        vocab_size=32000,
        **width,
        num_hidden_layers=a.layers,
        sliding_window=None,
        max_position_embeddings=4096,
        pad_token_id=0,
        param_dtype="float32",
        dtype="bfloat16",
    )
    batch = kwise_batch(np.random.default_rng(0), a.prompts, 7, a.length, 32000)
    tokens = int(batch["tokens"].size)
    cfg = ModelConfig(**cfg_kw)
    # PyTorch first, before JAX touches the GPU (run with XLA_PYTHON_CLIENT_PREALLOCATE=false so both fit)
    t = torch_step(cfg, batch, a.steps)
    print(f"torch: {t * 1e3:.1f} ms/step", flush=True)

    import jax

    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
    print(
        f"device {kind}; jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}",
        flush=True,
    )
    rows: list = []
    try:
        par = parity(rows)
    except Exception as e:  # keep the throughput rows if the parity part breaks on this machine's versions
        par = f"failed: {type(e).__name__}: {e}"
        print("parity failed:", par, flush=True)
    summary = {"device": kind, "parity_max_abs_reward_diff": par}
    results = {}
    for variant in a.variants.split(","):
        impl, remat = variant.split(":")
        try:
            s, c = jax_step(
                ModelConfig(**cfg_kw, attention_impl=impl, remat_policy=remat, scan_layers=True), batch, a.steps
            )
        except Exception as e:
            print(f"jax {variant} failed: {type(e).__name__}: {str(e)[:1500]}", flush=True)
            continue
        results[f"jax_{impl}_remat_{remat}"] = (s, c)
        print(f"jax {variant}: {s * 1e3:.1f} ms/step (compile {c:.1f} s)", flush=True)
    results["torch"] = (t, None)
    flops = cfg.flops_per_token(a.length) * tokens
    for name, (s, c) in results.items():
        mfu = flops / s / peak if peak else None
        mfu_text = f"MFU {mfu:.1%}" if mfu is not None else "MFU n/a"
        rows.append(
            (
                "train step",
                name,
                f"{s * 1e3:.1f} ms",
                f"{tokens / s:,.0f} tok/s",
                mfu_text,
                f"speed vs torch {t / s:.2f}x",
            )
        )
        summary[name] = {
            "step_s": round(s, 4),
            "tokens_per_s": round(tokens / s),
            "mfu": round(mfu, 4) if mfu is not None else None,
            "compile_s": round(c, 1) if c else None,
            "speed_vs_torch": round(t / s, 3),
        }
    print(
        f"\nmodel: hidden {cfg.hidden_size}, {a.layers} layers; batch {a.prompts}x7x{a.length} = {tokens} tokens; "
        f"model FLOPs/step {flops:.3e}; peak bf16 {peak or 0:.3g} FLOP/s"
    )
    for r in rows:
        print(" | ".join(str(x) for x in r))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
