"""Nectar prompts per second for DPO updates: starling_jax K-wise DPO vs trl's DPOTrainer on 21 pairs, in one run.

Work per optimizer update: P Nectar-format prompts with K = 7 ranked answers (no ties). One tiny Mistral policy is
created once (starling_jax's `tiny_policy`: 32k vocabulary, hidden 64, 2 layers) and exported to an HF folder
(`export_causal_lm`, the tokenizer and chat template included); both systems load that folder.

  starling_jax kwise   `train_dpo`'s own job and step, set up as the loop does (`DPOJob.setup`, the one state
                       builder, `DPOJob.steps`; timed: `Steps.train`, the loop's step): the prompt once
                       and its 7 answers after it (layout shared_prefix, packed rows of max_length tokens), the
                       Plackett-Luce loss over the implied rewards, one AdamW update.
  trl DPOTrainer       the same rankings cut into every ordered pair (21 per prompt), all 21·P pairs in one
                       batch (one update, like ours); trl concatenates chosen and rejected into one forward, so
                       each pair re-encodes the prompt twice.

A second row pair is plain pairs (K = 2, rows holding one chosen and one rejected answer): starling_jax
(`loss.name=pairwise`, shared prefix: the prompt once for its two answers) vs trl on the same P₂ pairs.

Fairness (what trl is given):
- the SAME token ids: trl's `_prepare_dataset` is bypassed with the `prompt_ids`/`chosen_ids`/`rejected_ids` cut
  from starling_jax's tokenization (prompt = the answer's tokens before `answer_start`), so both systems train on
  identical sequences (trl's own tokenization of the text is not used: it appends an EOS and cuts the prompt
  where the tokenized prompt and prompt + answer diverge);
- reference log-probs precomputed on both sides (`precompute_ref_log_probs=True` / `reference_logps=precompute`):
  it removes the reference forward from trl's step (`--reference on_the_fly` times both with it);
- fp32 on both sides, `torch.set_num_threads(--threads)` (default: all cores, which XLA's CPU client also uses);
  no logging, evaluation, checkpointing or progress bar in trl (`logging_strategy/eval_strategy/save_strategy
  =no`, `report_to=none`, `disable_tqdm`); dropout off (the Mistral config has none anyway);
- the same optimizer: AdamW (β = 0.9, 0.95, ε 1e-8, no weight decay), constant lr, gradient clipping at 1.0, β 0.1;
- timing: trl's update time is `on_step_begin` → `on_step_end` of a callback (forward, backward, clipping,
  optimizer; its collation happens before `on_step_begin`, as our host batches are read before the timed call);
  ours is the loop's step (`Steps.train`: the batch's reference log-probs looked up and put on the device, the
  jitted update) until its metrics are on the host. The first `--warmup` updates (XLA compilation; PyTorch's first
  allocations) are excluded from the median and reported separately (`compile_s`, `trl_first_step_s`).

Rows (Nectar schema, written to a temporary file): "\\n\\nHuman: … \\n\\nAssistant:" prompts and answers of common
English words (≈ 1 token each), lengths log-normal like Nectar's: prompt median 64 words (σ 0.8), answers median
128 (σ 0.7), each sequence ≤ --max-length tokens, ranks a permutation of 1..7. `loss_first`/`loss_last` of each
system show that it trained (they are different batches' losses: each update reads new rows). Defaults are small because
trl's step at P = 1 already holds 42 sequences of ~200-500 tokens, each with 32k-vocabulary logits, on a shared
2-core CPU; the ratio does not depend on P (both sides' work is linear in it).

    python bench/dpo_nectar.py               # P = 1 prompt (21 pairs) per update, 8 plain pairs, 2 timed steps
    python bench/dpo_nectar.py --quick       # short rows, 1 timed step (CI smoke test)
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

K = 7
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up other about "
    "out many then them these so some her would make like him into time has look two more write go see number no "
    "way could people my than first water been call who oil its now find long down day did get come made may part"
).split()
LENGTHS = {"prompt": (64, 0.8, 8, 384), "answer": (128, 0.7, 4, 512), "max_length": 512}
QUICK_LENGTHS = {"prompt": (6, 0.3, 2, 10), "answer": (6, 0.3, 2, 10), "max_length": 48}


def nectar_rows(n: int, seed: int, lengths: dict, k: int) -> list[dict]:
    """n Nectar-schema rows, k answers ranked 1..k (no ties), word counts drawn like Nectar's token lengths."""
    rng = np.random.default_rng(seed)

    def draw(kind, size):
        median, sigma, lo, hi = lengths[kind]
        return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(size))), lo, hi).astype(int)

    def text(m):
        return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=m))

    rows = []
    for _ in range(n):
        p = int(draw("prompt", 1)[0])
        # room for the template's tokens (~20) and the word → token ratio (~1.1)
        answers = np.minimum(draw("answer", k), int((lengths["max_length"] - 24) / 1.15) - p)
        ranks = rng.permutation(k) + 1
        rows.append(
            {
                "prompt": f"\n\nHuman: {text(p)}\n\nAssistant:",
                "answers": [
                    {"answer": text(max(int(a), 1)), "model": f"m{j}", "rank": float(r)}
                    for j, (a, r) in enumerate(zip(answers, ranks))
                ],
                "turns": 1,
                "num_responses": k,
                "source": ["bench"],
                "good_natured": True,
            }
        )
    return rows


def write_rows(rows, path: Path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_policy(folder: Path) -> Path:
    """The tiny policy, random init (seed 0), exported as an HF MistralForCausalLM folder with the llama2_chat
    tokenizer: the one set of weights both systems load."""
    import jax

    from starling_jax.data.tokenizer import default_tokenizer_dir, load_tokenizer
    from starling_jax.model import create
    from starling_jax.parallel import sharding
    from starling_jax.train.sft_config import tiny_policy
    from starling_jax.train.sft_job import export_causal_lm

    cfg = tiny_policy()
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    _, params = create.create_sharded(cfg, "causal_lm", mesh, seed=0)
    tok_dir = default_tokenizer_dir("llama2_chat")
    return export_causal_lm(folder, cfg, params, load_tokenizer(tok_dir), tok_dir, "llama2_chat")


# ---------------------------------------------------------------------------------------------- starling_jax
def loop_step(job, mesh):
    """`job` set up as `train/loop.py` does it: `job.setup` → the one state builder → `job.steps` (jitted once)
    → (set-up, state, frozen models, the `Steps` whose `train(state, frozen, host_batch)` is the loop's step)."""
    from starling_jax.train.state import abstract_train_state, build_train_state

    setup = job.setup(mesh)
    state, shardings = build_train_state(
        setup.params, setup.params_shardings, setup.optimizer.tx, mesh, job.cfg.seed, setup.extra_state
    )
    steps = job.steps(mesh, setup, abstract_train_state(state, shardings))
    frozen = setup.frozen
    setup.params, setup.frozen = None, {}  # the state and `frozen` hold them now (the step donates the state)
    return setup, state, frozen, steps


class OurSide:
    """`train_dpo`'s job set up on the bench file as the loop sets it up; `step()` = one timed loop step
    (`Steps.train`) on the next host batch, read before timing."""

    def __init__(self, policy: Path, train_file: str, eval_file: str, args, k: int, prompts: int, loss: str, lr):
        import jax

        from starling_jax.parallel import sharding
        from starling_jax.train.dpo_config import DPOLossConfig, DPORunConfig
        from starling_jax.train.dpo_job import DPOJob
        from starling_jax.train.job import TrainConfig
        from starling_jax.train.optimizer import OptimConfig
        from starling_jax.train.rm_config import DataConfig
        from starling_jax.train.runtime import RuntimeConfig

        cfg = DPORunConfig(
            output_dir=tempfile.mkdtemp(prefix="dpo_bench_"),
            policy=str(policy),
            reference_logps="precompute" if args.reference == "precompute" else "on_the_fly",
            runtime=RuntimeConfig(attention_impl=args.attention),
            data=DataConfig(
                train=train_file,
                eval=eval_file,
                template="llama2_chat",
                max_length=args.max_length,
                pad_to_multiple=32,
                num_answers=k,
                batch_size=prompts,
                eval_batch_size=prompts,
                layout="shared_prefix",
                packing=True,
            ),
            loss=DPOLossConfig(name=loss, beta=0.1),
            optim=OptimConfig(learning_rate=lr, schedule="constant"),
            train=TrainConfig(steps=1000),
        )
        self.job = DPOJob(cfg)
        # the reference log-probs (precompute) are computed here, in `job.steps`, before any timed step
        self.setup, self.state, self.frozen, self.steps = loop_step(
            self.job, sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
        )
        self.batches = []  # host batches, read before timing (as trl collates before on_step_begin)
        for batch in iter(self.setup.train_data):
            self.batches.append((batch, int(np.sum(batch["segment_ids"] != 0))))
            if len(self.batches) == args.warmup + args.steps:
                break
        self.setup.train_data.close()  # no prefetch threads while timing
        self.tokens = int(self.batches[0][0]["tokens"].size)
        self.i = 0
        self.losses: list[float] = []
        self.real_tokens: list[int] = []

    def step(self) -> None:
        import jax

        batch, real = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.state, metrics, _ = self.steps.train(self.state, self.frozen, batch)
        self.losses.append(float(jax.device_get(metrics["loss"])))
        self.real_tokens.append(real)

    def close(self) -> None:
        self.setup.close()


def pair_rows(job, k: int) -> list[dict]:
    """Every ordered pair of each train ranking as trl's pre-tokenized row: the SAME ids starling_jax trains on."""
    from starling_jax.data.pipeline import select_answers

    src = job.train_data.source
    out = []
    for i in range(len(src)):
        ex = src[i]
        sel = select_answers(ex["ranks"], k)
        start = min(int(ex["answer_start"][j]) for j in sel)  # the shared prompt (identical for every answer)
        prompt = list(ex["tokens"][sel[0]][:start])
        for a in sel:
            for b in sel:
                if ex["ranks"][a] < ex["ranks"][b]:
                    out.append(
                        {
                            "prompt_ids": prompt,
                            "chosen_ids": list(ex["tokens"][a][start:]),
                            "rejected_ids": list(ex["tokens"][b][start:]),
                        }
                    )
    return out


# ---------------------------------------------------------------------------------------------- trl
def trl_side(policy: Path, pairs: list[dict], pairs_per_step: int, args, lr: float, out_dir: str) -> dict:
    """trl's DPOTrainer for warmup + steps updates of `pairs_per_step` pairs → {step_s (median), first_step_s,
    losses, tokens (padded), real}."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids (starling_jax's tokenization)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self.start = [], [], 0.0

        def on_step_begin(self, *a, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **kw):
            self.times.append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    steps = args.warmup + args.steps
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(policy)
    config = DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=pairs_per_step,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        precompute_ref_log_probs=args.reference == "precompute",
        precompute_ref_batch_size=pairs_per_step,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        logging_strategy="no",
        eval_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    timer = Timer()
    trainer = PreTokenized(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(pairs[: steps * pairs_per_step]),
        processing_class=tok,
        callbacks=[timer],
    )
    losses, tokens, real = [], [], []
    compute_loss = trainer.compute_loss

    def recording_loss(model, inputs, *a, **kw):
        out = compute_loss(model, inputs, *a, **kw)
        losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        tokens.append(int(inputs["input_ids"].numel()))
        real.append(int(inputs["attention_mask"].sum()))
        return out

    trainer.compute_loss = recording_loss
    trainer.train()
    return {
        "step_s": statistics.median(timer.times[args.warmup :]),
        "first_step_s": timer.times[0],
        "losses": losses,
        "tokens": int(statistics.median(tokens)),  # per update: chosen + rejected rows, padded to the longest
        "real": int(statistics.median(real)),
    }


# ---------------------------------------------------------------------------------------------- main
def run_pair(name: str, policy: Path, tmp: Path, args, k: int, prompts: int, loss: str) -> dict:
    """One comparison: starling_jax on K-wise rows vs trl on their pairs, `prompts` prompts per update."""
    import jax

    n = prompts * (args.warmup + args.steps)
    train = write_rows(nectar_rows(n, 1 if k == K else 2, args.lengths, k), tmp / f"{name}_train.jsonl")
    evals = write_rows(nectar_rows(prompts, 3, args.lengths, k), tmp / f"{name}_eval.jsonl")
    ours = OurSide(policy, train, evals, args, k, prompts, loss, args.lr)
    pairs = pair_rows(ours.job, k)
    pairs_per_step = len(pairs) // (args.warmup + args.steps)
    assert pairs_per_step == prompts * k * (k - 1) // 2, (len(pairs), pairs_per_step)
    first = time.perf_counter()
    ours.step()  # compiles
    compile_s = time.perf_counter() - first
    for _ in range(args.warmup - 1):
        ours.step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        ours.step()
        times.append(time.perf_counter() - start)
    ours.close()
    jax.clear_caches()
    theirs = trl_side(policy, pairs, pairs_per_step, args, args.lr, str(tmp / f"trl_{name}"))
    ours_s = statistics.median(times)
    return {
        "name": name,
        "k": k,
        "prompts": prompts,
        "pairs_per_update": pairs_per_step,
        "ours": {
            "step_s": ours_s,
            "prompts_per_s": prompts / ours_s,
            "compile_s": compile_s,
            "tokens": ours.tokens,
            "real": int(statistics.median(ours.real_tokens)),
            "loss_first": ours.losses[0],
            "loss_last": ours.losses[-1],
        },
        "trl": {
            "step_s": theirs["step_s"],
            "prompts_per_s": prompts / theirs["step_s"],
            "first_step_s": theirs["first_step_s"],
            "tokens": theirs["tokens"],
            "real": theirs["real"],
            "loss_first": theirs["losses"][0],
            "loss_last": theirs["losses"][-1],
        },
        "speedup": theirs["step_s"] / ours_s,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1, help="K=7 rankings per update (trl: 21 x as many pairs)")
    ap.add_argument("--pair-prompts", type=int, default=8, help="plain pairs (K=2) per update")
    ap.add_argument("--steps", type=int, default=2, help="timed updates per system (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first updates (compilation)")
    ap.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default 512; quick 48)")
    ap.add_argument("--reference", choices=("precompute", "on_the_fly"), default="precompute")
    ap.add_argument("--attention", default="blockwise", help="starling_jax runtime.attention_impl")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--quick", action="store_true", help="short rows, 1 timed update (smoke test)")
    args = ap.parse_args(argv)
    args.lengths = dict(QUICK_LENGTHS if args.quick else LENGTHS)
    if args.quick:
        args.prompts, args.pair_prompts, args.steps, args.warmup = 1, 2, 1, 1
    if args.max_length:
        args.lengths["max_length"] = args.max_length
    args.max_length = args.lengths["max_length"]
    args.warmup = max(args.warmup, 1)

    import jax
    import torch
    import trl

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}; jax {jax.__version__}, torch {torch.__version__} ({args.threads} threads), "
        f"trl {trl.__version__}"
    )
    print(
        f"# tiny policy (32k vocab, hidden 64, 2 layers), fp32, reference {args.reference}; max_length "
        f"{args.max_length}; median of {args.steps} updates after {args.warmup} warm-up; lengths {args.lengths}"
    )
    with tempfile.TemporaryDirectory(prefix="dpo_nectar_") as tmp_name:
        tmp = Path(tmp_name)
        policy = make_policy(tmp / "policy")
        results = [
            run_pair("kwise", policy, tmp, args, K, args.prompts, "kwise"),
            run_pair("pairwise", policy, tmp, args, 2, args.pair_prompts, "pairwise"),
        ]

    print("\n| work per update | system | prompts/s | update s | warm-up s | tokens (padded) | non-padding | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        work = f"{r['prompts']} prompts x K={r['k']} ({r['pairs_per_update']} pairs)"
        o, t = r["ours"], r["trl"]
        print(
            f"| {work} | starling_jax {r['name']} shared-prefix | {o['prompts_per_s']:.3f} | {o['step_s']:.3f} | "
            f"{o['compile_s']:.1f} (compile) | {o['tokens']} | {o['real'] / o['tokens']:.2f} | "
            f"**{r['speedup']:.2f}** |"
        )
        print(
            f"| {work} | trl DPOTrainer (pairs) | {t['prompts_per_s']:.3f} | {t['step_s']:.3f} | "
            f"{t['first_step_s']:.1f} (1st step) | {t['tokens']} | {t['real'] / t['tokens']:.2f} | 1.00 |"
        )
    kw, pw = results
    summary = {
        "bench": "dpo_nectar",
        "status": "ok",
        "speedup": round(kw["speedup"], 3),
        "speedup_pairwise": round(pw["speedup"], 3),
        "prompts_per_s": round(kw["ours"]["prompts_per_s"], 4),
        "trl_prompts_per_s": round(kw["trl"]["prompts_per_s"], 4),
        "pairwise_prompts_per_s": round(pw["ours"]["prompts_per_s"], 4),
        "trl_pairwise_prompts_per_s": round(pw["trl"]["prompts_per_s"], 4),
        "compile_s": round(kw["ours"]["compile_s"], 2),
        "trl_first_step_s": round(kw["trl"]["first_step_s"], 2),
        "loss": {
            f"{r['name']}_{side}": [round(r[side]["loss_first"], 5), round(r[side]["loss_last"], 5)]
            for r in results
            for side in ("ours", "trl")
        },
        "prompts": args.prompts,
        "pair_prompts": args.pair_prompts,
        "max_length": args.max_length,
        "reference": args.reference,
        "threads": args.threads,
        "load_at_start": load[0],
        "quick": args.quick,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
