"""Seconds per GRPO iteration: starling_jax `train_ppo algorithm=grpo` vs trl's GRPOTrainer, in one run.

One iteration, the same in both systems: P prompts, G answers each sampled by the policy (temperature 1, no top-k /
top-p, `--new-tokens` new tokens at most), scored by the reward model, group advantages (r − mean) / (std + ε)
per prompt, the reference's log-probs, and one optimizer update over all P·G answers (one minibatch, one epoch:
trl's `steps_per_generation=1`, `num_iterations=1`) with the k3 KL to the reference in the loss (β 0.04; trl's
`beta`, ours `kl.in_loss=true kl.coef=0.04`), PPO clip 0.2, loss averaged per sequence then over sequences (trl
`loss_type=grpo`, ours `loss.aggregation=sequence_mean`).

Models, created once and loaded by both systems from HF folders: the tiny policy of bench/dpo_nectar.py
(`MistralForCausalLM`, 32k vocabulary, hidden 64, 2 layers) and a reward model of the same shape exported by
starling_jax as `MistralForSequenceClassification` (random weights: the scores' values do not change the work).
trl gets the reward model as `reward_funcs` (loaded by transformers, with its tokenizer as
`reward_processing_classes`): it decodes each completion and scores the conversation rendered by the RM
tokenizer's chat template; ours re-renders the same way (`reward_model_shares_tokenizer=false`, `rm_template:
tokenizer`). Prompts: conversational rows of common English words (`--prompt-words` words), the policy's chat
template (llama2_chat) on both sides.

Fairness: fp32, `torch.set_num_threads(--threads)` (all cores by default, as XLA); trl with no logging, eval,
checkpoints, completion printing or progress bar, no vLLM (none on CPU: transformers' `generate` with its KV cache);
trl's iteration is timed `on_step_begin` → `on_step_end` (its generation, scoring, reference forward, update all
happen in that step), ours is the loop's step (`Steps.train` of `PPOJob.steps`, the job set up as `train/loop.py`
does: the same four parts) until its metrics are on the host. The first `--warmup` iterations (XLA compilation;
PyTorch's first allocations) are excluded and reported separately.

    python bench/grpo.py            # P = 2 prompts x G = 4 answers, 32 new tokens, 3 timed iterations
    python bench/grpo.py --quick    # 8 new tokens, 1 timed iteration (CI smoke test)
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dpo_nectar  # noqa: E402  (the shared tiny policy and word list)
import numpy as np  # noqa: E402

BETA, CLIP, EPS = 0.04, 0.2, 1e-4


def make_reward_model(folder: Path) -> Path:
    """A reward model shaped like the tiny policy (random init, seed 1) exported as HF
    MistralForSequenceClassification with the llama2_chat tokenizer and chat template."""
    import jax

    from starling_jax.data.tokenizer import default_tokenizer_dir
    from starling_jax.model import create, hf_io
    from starling_jax.parallel import sharding
    from starling_jax.train.sft_config import tiny_policy

    cfg = tiny_policy()
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    _, params = create.create_sharded(cfg, "reward", mesh, seed=1)
    return hf_io.save_hf(
        folder, cfg, params, "reward", tokenizer_dir=default_tokenizer_dir("llama2_chat"), template="llama2_chat"
    )


def prompt_texts(n: int, words: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(dpo_nectar.WORDS[int(i)] for i in rng.integers(0, len(dpo_nectar.WORDS), words)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- starling_jax
def ours(policy: Path, rm: Path, prompts_file: Path, args, out_dir: str) -> dict:
    import jax

    from starling_jax.config import load_config
    from starling_jax.parallel import sharding
    from starling_jax.rl.config import PPORunConfig
    from starling_jax.rl.job import PPOJob

    batch = args.prompts * args.group_size
    cfg = load_config(
        PPORunConfig,
        None,
        [
            "algorithm=grpo",
            f"output_dir={out_dir}",
            f"policy={policy}",
            f"reward_model={rm}",
            "reward_model_shares_tokenizer=false",
            f"prompts.train={prompts_file}",
            "prompts.eval_prompts=1",
            f"prompts.max_prompt_tokens={args.max_prompt_tokens}",
            f"prompts.rm_max_length={args.max_prompt_tokens + args.new_tokens + 32}",
            f"rollout.batch_size={batch}",
            f"rollout.minibatch_size={batch}",
            f"rollout.group_size={args.group_size}",
            "rollout.epochs=1",
            f"rollout.max_new_tokens={args.new_tokens}",
            "rollout.temperature=1.0",
            "reward.normalize=none",
            "reward.clip=0",
            "advantage.scale_rewards=group",
            f"advantage.eps={EPS}",
            "advantage.whiten=false",
            "kl.in_loss=true",
            f"kl.coef={BETA}",
            f"loss.clip={CLIP}",
            "loss.aggregation=sequence_mean",
            f"optim.learning_rate={args.lr}",
            f"train.steps={args.warmup + args.steps}",
            "train.progress_bar=false",
        ],
    )
    job = PPOJob(cfg)
    setup, state, frozen, steps = dpo_nectar.loop_step(job, sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    batches = iter(setup.train_data)
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        host_batch = next(batches)
        start = time.perf_counter()
        state, metrics, _ = steps.train(state, frozen, host_batch)
        metrics = jax.device_get(metrics)
        times.append(time.perf_counter() - start)
        losses.append(float(metrics["loss"]))
    setup.close()
    return {
        "step_s": statistics.median(times[args.warmup :]),
        "first_step_s": times[0],
        "losses": losses,
        # the last iteration's parts, from its metrics (time/generate_s, time/score_s, time/update_s)
        "timing": {k.removeprefix("time/"): round(float(v), 3) for k, v in metrics.items() if k.startswith("time/")},
        "metric_keys": sorted(metrics),
    }


# ---------------------------------------------------------------------------------------------- trl
def trl_side(policy: Path, rm: Path, prompts: list[str], args, out_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *a, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **kw):
            self.times.append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    steps = args.warmup + args.steps
    batch = args.prompts * args.group_size
    config = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=args.group_size,
        max_completion_length=args.new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=BETA,
        epsilon=CLIP,
        scale_rewards="group",
        loss_type="grpo",
        max_steps=steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        logging_strategy="no",
        eval_strategy="no",
        save_strategy="no",
        log_completions=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm, dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts[: steps * args.prompts]])
    timer = Timer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_model,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(policy, padding_side="left"),
        reward_processing_classes=AutoTokenizer.from_pretrained(rm),
        callbacks=[timer],
    )
    losses = []
    compute_loss = trainer.compute_loss

    def recording_loss(model, inputs, *a, **kw):
        out = compute_loss(model, inputs, *a, **kw)
        losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out

    trainer.compute_loss = recording_loss
    trainer.train()
    return {"step_s": statistics.median(timer.times[args.warmup :]), "first_step_s": timer.times[0], "losses": losses}


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2, help="prompts per iteration")
    ap.add_argument("--group-size", type=int, default=4, help="G: answers per prompt")
    ap.add_argument("--new-tokens", type=int, default=32, help="new tokens per answer (at most)")
    ap.add_argument("--prompt-words", type=int, default=24, help="words per prompt (about one token each)")
    ap.add_argument("--steps", type=int, default=3, help="timed iterations per system (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first iterations (compilation)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--quick", action="store_true", help="8 new tokens, 1 timed iteration (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.new_tokens, args.prompt_words, args.steps, args.warmup = 8, 8, 1, 1
    args.warmup = max(args.warmup, 1)
    args.max_prompt_tokens = 2 * args.prompt_words + 32  # never cuts: the template adds ~20 tokens

    import jax
    import torch
    import trl

    from starling_jax.data.chat import to_hh

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}; jax {jax.__version__}, torch {torch.__version__} ({args.threads} threads), "
        f"trl {trl.__version__}"
    )
    print(
        f"# tiny policy and reward model (32k vocab, hidden 64, 2 layers), fp32; {args.prompts} prompts x G = "
        f"{args.group_size}, {args.new_tokens} new tokens, prompts of {args.prompt_words} words; median of "
        f"{args.steps} iterations after {args.warmup} warm-up"
    )
    n = (args.warmup + args.steps) * args.prompts
    texts = prompt_texts(n + 1, args.prompt_words, 0)  # + 1: ours holds one out for its (unused) eval
    with tempfile.TemporaryDirectory(prefix="grpo_bench_") as tmp_name:
        tmp = Path(tmp_name)
        policy = dpo_nectar.make_policy(tmp / "policy")
        rm = make_reward_model(tmp / "rm")
        prompts_file = tmp / "prompts.jsonl"
        prompts_file.write_text(
            "".join(json.dumps({"prompt": to_hh([{"role": "user", "content": t}])}) + "\n" for t in texts)
        )
        o = ours(policy, rm, prompts_file, args, str(tmp / "ours"))
        jax.clear_caches()
        t = trl_side(policy, rm, texts, args, str(tmp / "trl"))

    speedup = t["step_s"] / o["step_s"]
    print("\n| system | iteration s | warm-up s | vs trl |")
    print("|---|---|---|---|")
    print(
        f"| starling_jax train_ppo algorithm=grpo | {o['step_s']:.3f} | {o['first_step_s']:.1f} (compile) | "
        f"**{speedup:.2f}** |"
    )
    print(f"| trl GRPOTrainer | {t['step_s']:.3f} | {t['first_step_s']:.1f} (1st step) | 1.00 |")
    print(f"\nstarling_jax last iteration: {o['timing']}")
    summary = {
        "bench": "grpo",
        "status": "ok",
        "speedup": round(speedup, 3),
        "iteration_s": round(o["step_s"], 4),
        "trl_iteration_s": round(t["step_s"], 4),
        "compile_s": round(o["first_step_s"], 2),
        "trl_first_step_s": round(t["first_step_s"], 2),
        "timing": o["timing"],
        "loss": {"ours": [round(x, 6) for x in o["losses"]], "trl": [round(x, 6) for x in t["losses"]]},
        "prompts": args.prompts,
        "group_size": args.group_size,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "load_at_start": load[0],
        "quick": args.quick,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
