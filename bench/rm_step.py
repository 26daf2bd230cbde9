"""Reward-model train-step benchmark: starling_jax vs transformers (PyTorch), in one run.

One step = forward over B·K sequences + K-wise Plackett-Luce loss + backward + AdamW update (clip 1.0,
b1 0.9, b2 0.95, no weight decay) — the real `jit_train_step` of `starling_jax/train/rm_step.py` on a
1-device mesh, against `MistralForSequenceClassification` (sdpa attention, `torch.set_num_threads(2)`) with the
same Plackett-Luce loss written in torch and `torch.optim.AdamW`.

    python bench/rm_step.py                      # model A, 10 timed steps
    python bench/rm_step.py --models A,B --steps 5
    python bench/rm_step.py --quick              # model A on a 2 × 7 × 64 batch, 1 timed step, headline rows only
                                                 # (a smoke test of the code path; its ratio is not the headline)
    python bench/rm_step.py --variants           # also decoder variants (attention / embedding formulations)
    python bench/rm_step.py --profile            # also forward and forward+backward timed separately
    python bench/rm_step.py --attention einsum,blockwise   # attention implementations timed (fp32 rows)
    python bench/rm_step.py --attention blockwise,blockwise:256   # impl:block = with runtime.attention_block

Timings are medians of N steps after warm-up, taken in interleaved rounds (each round settles and then times one
call of every row, PyTorch's included: `time_interleaved`), so every row sees the same machine; JAX compile time
is excluded from the step time and reported separately. The last printed line is a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

MODELS = {
    "A": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4),
    "B": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8),
}
COMMON = dict(vocab_size=32000, num_attention_heads=8, num_key_value_heads=4, sliding_window=None)
PROMPTS, ANSWERS, LENGTH = 4, 7, 256


def make_batch(seed: int = 0, prompts: int = PROMPTS, answers: int = ANSWERS, length: int = LENGTH) -> dict:
    """A K-wise batch of full-length sequences (no padding), ranks a random permutation per prompt."""
    rng = np.random.default_rng(seed)
    shape = (prompts, answers, length)
    return {
        "tokens": rng.integers(1, COMMON["vocab_size"], size=shape).astype(np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), shape).copy(),
        "segment_ids": np.ones(shape, np.int32),
        "reward_index": np.full((prompts, answers), length - 1, np.int32),
        "ranks": np.stack([rng.permutation(answers) + 1 for _ in range(prompts)]).astype(np.float32),
        "answer_mask": np.ones((prompts, answers), bool),
    }


def timed(fn, steps: int, warmup: int) -> tuple[float, list[float]]:
    """(median, all) seconds of `steps` calls of fn after `warmup` calls (the timing of bench/rm_nectar.py and
    bench/gpu_step.py; this benchmark interleaves its rows instead, `time_interleaved`)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


# ---------------------------------------------------------------------------------------------- PyTorch
def torch_rows(model_name: str, batch: dict, forward_only: bool) -> list[dict]:
    """Rows {kind, impl, fn (one timed call), compile_s} of the PyTorch side."""
    import torch
    from transformers import MistralConfig, MistralForSequenceClassification

    torch.set_num_threads(2)
    torch.manual_seed(0)
    m = MODELS[model_name]
    cfg = MistralConfig(**COMMON, **m, num_labels=1, pad_token_id=0, initializer_range=0.02, attn_implementation="sdpa")
    model = MistralForSequenceClassification(cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    b, k, length = batch["tokens"].shape
    tokens = torch.from_numpy(batch["tokens"].reshape(b * k, length)).long()
    attn = torch.from_numpy(batch["segment_ids"].reshape(b * k, length) != 0).long()
    order = torch.from_numpy(np.argsort(batch["ranks"], axis=1, kind="stable"))  # best first (no ties here)

    def pl_loss(rewards):  # Plackett-Luce NLL of the rank order, mean over prompts
        r = torch.gather(rewards, 1, order)
        lse = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)
        return -(r - lse).sum(-1).mean()

    def step():
        opt.zero_grad(set_to_none=True)
        rewards = model(input_ids=tokens, attention_mask=attn).logits[:, 0].view(b, k)
        loss = pl_loss(rewards)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    rows = [dict(kind="train step", impl="PyTorch fp32 (sdpa)", fn=step, compile_s=0.0)]
    if forward_only:

        def score():
            with torch.inference_mode():
                return model(input_ids=tokens, attention_mask=attn).logits[:, 0].sum().item()

        rows.append(dict(kind="forward only (scoring)", impl="PyTorch fp32 (sdpa)", fn=score, compile_s=0.0))
    return rows


# ---------------------------------------------------------------------------------------------- JAX variants
@contextlib.contextmanager
def decoder_variant(attention: str = "einsum", embed: str = "take"):
    """Temporarily swaps the attention / embedding formulation of `starling_jax.model.decoder` (for measuring
    candidates before changing the module). "einsum" / "take" = the module as it is."""
    import jax
    import jax.numpy as jnp

    from starling_jax.model import decoder as dec
    from starling_jax.parallel.sharding import constrain

    saved = (dec.Attention.__call__, dec.Decoder.embed_tokens)

    def qkv(self, x, rot):
        return self.project_qkv(x, rot)

    def attn_dpa(self, x, rot, mask):
        # jax.nn.dot_product_attention (XLA impl), GQA natively, boolean mask [N, 1, L, L].
        q, k, v = qkv(self, x, rot)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, 0], implementation="xla")
        return jnp.einsum("nlhk,hkd->nld", out, self.o_proj[...].astype(self.cfg.jnp_dtype))

    def attn_bias(self, x, rot, mask):
        # the module's einsums, with an additive f32 bias instead of a select on the scores (backward of an add
        # is the identity), and the 1/sqrt(Dh) folded into q.
        cfg, dtype = self.cfg, self.cfg.jnp_dtype
        n, length, _ = x.shape
        g, dh = cfg.num_key_value_heads, cfg.resolved_head_dim
        q, k, v = qkv(self, x, rot)
        q = (q * (dh**-0.5)).astype(dtype).reshape(n, length, g, -1, dh)
        bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min / 2).astype(jnp.float32)
        scores = jnp.einsum("nqgrk,nsgk->ngrqs", q, k, preferred_element_type=jnp.float32) + bias
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jnp.einsum("ngrqs,nsgk->nqgrk", probs, v).reshape(n, length, cfg.num_attention_heads, dh)
        return jnp.einsum("nlhk,hkd->nld", out, self.o_proj[...].astype(dtype))

    def embed_clip(self, tokens):
        table = constrain(self.embed[...].astype(self.cfg.jnp_dtype), (None, None))
        return jnp.take(table, tokens, axis=0, mode="clip")

    attentions = {"einsum": saved[0], "dpa": attn_dpa, "bias": attn_bias}
    embeds = {"take": saved[1], "clip": embed_clip}
    dec.Attention.__call__ = attentions[attention]
    dec.Decoder.embed_tokens = embeds[embed]
    try:
        yield
    finally:
        dec.Attention.__call__, dec.Decoder.embed_tokens = saved


def jax_rows(
    model_name: str,
    batch: dict,
    dtype: str,
    label: str,
    forward_only: bool = False,
    profile: bool = False,
    attention: str = "einsum",
) -> list[dict]:
    """Rows {kind, impl, fn (one timed call), compile_s} of one starling_jax configuration, compiled here."""
    import jax
    import jax.numpy as jnp

    from starling_jax.model import create
    from starling_jax.model.config import ModelConfig
    from starling_jax.parallel import sharding
    from starling_jax.train import rm_step
    from starling_jax.train.optimizer import OptimConfig, make_optimizer
    from starling_jax.train.state import init_train_state

    impl, _, block = attention.partition(":")  # "blockwise:256" = runtime.attention_block 256
    cfg = ModelConfig(
        **COMMON,
        **MODELS[model_name],
        dtype=dtype,
        param_dtype="float32",
        pad_token_id=0,
        attention_impl=impl,
        attention_block=int(block or 0),
    )
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    graphdef, params = create.create_sharded(cfg, "reward", mesh, seed=0)
    _, abstract = create.abstract_model(cfg, "reward")
    params_shardings = sharding.state_shardings(abstract, mesh)
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-5), total_steps=1000)
    state, shardings = init_train_state(params, params_shardings, tx, mesh, seed=0)
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    gbatch = {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()}
    loss_cfg = rm_step.LossConfig()

    rows = []
    step_fn = rm_step.jit_train_step(graphdef, tx, schedule, loss_cfg, 1, mesh, shardings, batch_sh)
    start = time.perf_counter()
    compiled = step_fn.lower(state, gbatch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def step():
        new_state, metrics = compiled(holder["state"], gbatch)
        jax.block_until_ready((new_state, metrics))
        holder["state"] = new_state
        return metrics

    metrics = jax.device_get(step())
    assert bool(metrics["finite"]), metrics
    rows.append(dict(kind="train step", impl=label, fn=step, compile_s=compile_s))
    params = jax.tree.map(jnp.copy, holder["state"]["params"])  # the train step donates (deletes) its state

    def add(kind, fn, *args):
        start = time.perf_counter()
        c = jax.jit(fn).lower(*args).compile()
        cs = time.perf_counter() - start
        rows.append(dict(kind=kind, impl=label, fn=lambda: jax.block_until_ready(c(*args)), compile_s=cs))

    if forward_only or profile:
        add(
            "forward only (scoring)",
            lambda p, b: rm_step.eval_rewards(p, b, graphdef=graphdef, mesh=mesh),
            params,
            gbatch,
        )
    if profile:

        def loss_only(p, b):
            with sharding.activation_sharding(mesh):
                return rm_step.rm_loss(p, graphdef, b, loss_cfg)[0]

        add("forward + loss", loss_only, params, gbatch)
        add("forward + backward", jax.value_and_grad(loss_only), params, gbatch)
    return rows


def time_interleaved(rows: list[dict], steps: int, warmup: int) -> None:
    """Sets each row's `step_s`: the median of `steps` timed calls of its `fn`, after `warmup` calls, in rounds
    that visit every row in turn; at each visit one untimed call settles the row (its threads awake, its
    buffers back in cache after the other rows ran) before the timed one. Rows timed one after the other would
    each see a different machine (this VM's speed drifts by 10-20% within minutes; the side timed second ran
    slower in the same process), so their ratios would measure the drift; without the settling call, the first
    call after another framework's step pays for the switch (PyTorch's ~15%, XLA's less)."""
    for r in rows:
        for _ in range(warmup):
            r["fn"]()
    times = [[] for _ in rows]
    for _ in range(steps):
        for r, t in zip(rows, times):
            r["fn"]()
            start = time.perf_counter()
            r["fn"]()
            t.append(time.perf_counter() - start)
    for r, t in zip(rows, times):
        r["step_s"] = statistics.median(t)
        del r["fn"]


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="A", help="comma list of A (hidden 256, 4 layers), B (hidden 512, 8 layers)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: a 2 prompts x 7 answers x 64 tokens batch, 1 timed step, 1 warm-up, no extra rows",
    )
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16-compute row")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch (ratios then missing)")
    ap.add_argument(
        "--variants",
        action="store_true",
        help="also time decoder variants: attention dpa|bias, embedding take(mode=clip)",
    )
    ap.add_argument("--profile", action="store_true", help="also time forward and forward+backward separately")
    ap.add_argument(
        "--attention",
        default="blockwise,einsum",
        help="comma list of runtime.attention_impl values for the fp32 rows, each optionally "
        "impl:block for runtime.attention_block (default 0, by platform); the first is the "
        "headline (bf16 and variant rows use it too)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 1, 1
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    attentions = [a.strip() for a in args.attention.split(",") if a.strip()]
    if args.quick:  # the headline row only
        attentions, args.no_bf16 = attentions[:1], True
    for m in models:
        if m not in MODELS:
            ap.error(f"--models: unknown model {m!r}; choose from {sorted(MODELS)}")

    import jax
    import torch
    import transformers

    batch = make_batch(prompts=2, length=64) if args.quick else make_batch()
    b, k, length = batch["tokens"].shape
    tokens_per_step = b * k * length
    load = os.getloadavg()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f}; jax {jax.__version__} ({jax.devices()[0].platform}), torch "
        f"{torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"# batch {b} prompts x {k} answers x {length} tokens = {tokens_per_step} tokens; "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )

    results = []
    for m in models:
        rows = []
        if not args.no_torch:
            rows += torch_rows(m, batch, forward_only=not args.quick)
        for attention in attentions:
            rows += jax_rows(
                m,
                batch,
                "float32",
                f"starling_jax fp32 {attention}",
                forward_only=not args.quick,
                profile=args.profile,
                attention=attention,
            )
        if not args.no_bf16:
            rows += jax_rows(
                m, batch, "bfloat16", f"starling_jax bf16 compute {attentions[0]}", attention=attentions[0]
            )
        if args.variants:
            for attention, embed in (("einsum", "clip"), ("bias", "take"), ("dpa", "take"), ("bias", "clip")):
                with decoder_variant(attention, embed):
                    rows += jax_rows(
                        m, batch, "float32", f"variant fp32 attn={attention} embed={embed}", profile=args.profile
                    )
        time_interleaved(rows, args.steps, args.warmup)
        for r in rows:
            r["model"] = m
        results += rows

    base = {(r["model"], r["kind"]): r["step_s"] for r in results if r["impl"].startswith("PyTorch")}
    print("\n| model | measurement | implementation | tokens/s | prompts/s | step ms | vs PyTorch | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        r["tokens_per_s"] = tokens_per_step / r["step_s"]
        r["prompts_per_s"] = b / r["step_s"]
        ref = base.get((r["model"], r["kind"]))
        r["ratio_vs_torch"] = ref / r["step_s"] if ref else None
        ratio = f"{r['ratio_vs_torch']:.2f}" if ref else "–"
        print(
            f"| {r['model']} | {r['kind']} | {r['impl']} | {r['tokens_per_s']:.0f} | {r['prompts_per_s']:.2f} | "
            f"{r['step_s'] * 1e3:.0f} | {ratio} | {r['compile_s']:.1f} |"
        )
    # headline: PyTorch's fp32 train step / starling_jax's fp32 train step with the first --attention (model 1)
    head = next(
        (r for r in results if r["impl"] == f"starling_jax fp32 {attentions[0]}" and r["kind"] == "train step"), None
    )
    speedup = round(head["ratio_vs_torch"], 3) if head and head["ratio_vs_torch"] else None
    summary = {
        "bench": "rm_step",
        "status": "ok",
        "speedup": speedup,
        "attention": attentions[0],
        "batch": [b, k, length],
        "steps": args.steps,
        "load_at_start": load[0],
        "results": [{k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in r.items()} for r in results],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
