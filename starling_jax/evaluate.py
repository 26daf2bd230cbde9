"""Evaluate reward models and policies: RewardBench, best-of-n, judged and length-controlled win rates, MT-Bench.

    python -m starling_jax.evaluate rewardbench --model DIR [--reference DIR --beta B] [--data FILE_OR_HUB_ID]
    python -m starling_jax.evaluate bon --policy DIR --reward-model DIR [--n 1,2,4,8] [--prompts FILE]
    python -m starling_jax.evaluate policy --model DIR [--model DIR ...] --prompts FILE --judge rm:DIR|openai:MODEL
                                           [--reference-answers FILE] [--base-url URL]

`rewardbench`: the RewardBench v1 filtered set (`allenai/reward-bench`, or a local json/jsonl/parquet file with
`prompt`, `chosen`, `rejected`, `subset`, `id`) scored by a reward model, or by a DPO policy's implied rewards
β·Σ(log π − log π_ref) when `--reference` is given. Per-subset accuracy, the four section scores and the overall
score exactly as the `rewardbench` package computes them (`eval/rewardbench.py`), and per-subset accuracy when the
chosen answer is the longer vs the shorter one. A row with an unknown subset is a one-line error, or with
`--on-bad-row skip` a counted, reported skip.

`bon`: best-of-n: N = max(n) samples per prompt from the policy, scored by the reward model; mean reward of the
best of the first n vs n, with the analytic KL log n − (n − 1)/n (`eval/bon.py`).

`policy`: every `--model` answers the prompts with the sampler; the judge (`label`'s backends) compares each
answer with its reference answer: win rate, AlpacaEval 2's length-controlled win rate, mean answer length (and
with `rm:` the mean reward). An MT-Bench question file (rows with `turns`) is answered turn by turn and graded
1–10 per turn by an `openai:` judge with MT-Bench's judge prompts: score per category and overall. One comparison
table for all the models.

Each subcommand writes its per-example JSON lines, `results.json` and a PNG under `--output-dir` (default
runs/eval/SUBCOMMAND), prints its table on stderr, and its last printed line is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from starling_jax import cli
from starling_jax.errors import ConfigError

DEFAULT_PPO_HF_DIR = "runs/ppo_default/hf"  # where `python -m starling_jax.train_ppo` exports by default


def _out_dir(args, name: str) -> Path:
    out = Path(args.output_dir or f"runs/eval/{name}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_jsonl(path: Path, lines) -> None:
    with path.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def _plot(enabled: bool, fn, *args) -> str | None:
    return str(fn(*args)) if enabled else None


# ---------------------------------------------------------------------------------------------- rewardbench
def run_rewardbench(args) -> dict:
    from starling_jax.data.nectar import ReadReport
    from starling_jax.eval import plots
    from starling_jax.eval import rewardbench as rb

    report = ReadReport()
    examples = list(rb.read_examples(args.data, args.on_bad_row, report))  # bad input fails before a model loads
    rb.check_data(examples, args.data)
    model = cli.embedded_default(args.model, cli.DEFAULT_HF_DIR, "--model")
    if args.reference:
        scorer = rb.DPOScorer(
            model, args.reference, args.beta, args.template or "tokenizer", args.max_length or 2048, args.batch_size
        )
    else:
        scorer = rb.RewardModelScorer(model, args.template, args.max_length, args.batch_size)
    lines, results = rb.evaluate(examples, scorer)
    out = _out_dir(args, "rewardbench")
    _write_jsonl(out / "examples.jsonl", lines)
    skipped = {"rows": report.rows_skipped, "reasons": report.skipped[:20]}
    results.update(
        {
            "model": str(model),
            "reference": args.reference,
            "scorer": scorer.name,
            "data": str(args.data),
            "rows_read": report.rows_read,
            "rows_skipped": skipped,
        }
    )
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(rb.table(results), file=sys.stderr, flush=True)
    png = _plot(not args.no_plot, plots.rewardbench_png, results, out / "rewardbench.png", f"RewardBench: {model}")
    return {
        "status": "completed",
        "subcommand": "rewardbench",
        "output_dir": str(out),
        "model": str(model),
        "reference": args.reference,
        "scorer": scorer.name,
        "data": str(args.data),
        "overall": results["overall"],
        "sections": results["sections"],
        "sections_missing": results["sections_missing"],
        "subsets": results["subsets"],
        "accuracy": results["accuracy"],
        "rows_read": report.rows_read,
        "rows_scored": results["rows_scored"],
        "rows_not_scored": results["rows_not_scored"],
        "rows_skipped": report.rows_skipped,
        "examples": str(out / "examples.jsonl"),
        "results": str(out / "results.json"),
        "plot": png,
    }


# ---------------------------------------------------------------------------------------------- bon
def run_bon(args) -> dict:
    from starling_jax.eval import bon, plots
    from starling_jax.eval import policy as pol
    from starling_jax.generate import default_conversations, ensure_default_policy

    ns = bon.parse_ns(args.n)
    if args.prompts:
        kind, rows = pol.read_prompt_rows(args.prompts)
        if kind != "single":
            raise ConfigError(f"--prompts {args.prompts}: an MT-Bench question file; bon takes single-turn prompts")
        conversations = [conv for conv, _ in rows]
    else:
        conversations = default_conversations()
    reward_model = cli.embedded_default(args.reward_model, cli.DEFAULT_HF_DIR, "--reward-model")
    policy = args.policy if args.policy is not None else ensure_default_policy()
    out = _out_dir(args, "bon")
    samples = pol.generate_answers(policy, conversations, out / "samples.jsonl", _sampling(args), num_samples=ns[-1])
    rewards = pol.rm_rewards(reward_model, conversations, samples, f"rm:{reward_model}", args.max_length)
    kept = [i for i, r in enumerate(rewards) if not isinstance(r, str)]
    if not kept:
        raise ConfigError(f"no prompt could be scored by {reward_model}: {rewards[0]}")
    rows = bon.best_of_n_table([rewards[i] for i in kept], ns)
    _write_jsonl(
        out / "rewards.jsonl",
        [
            {
                "row": i + 1,
                "rewards": r if not isinstance(r, str) else None,
                **({"error": r} if isinstance(r, str) else {}),
            }
            for i, r in enumerate(rewards)
        ],
    )
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(bon.table(rows), file=sys.stderr, flush=True)
    png = _plot(not args.no_plot, plots.bon_png, rows, out / "bon.png", f"best-of-n: {policy}")
    return {
        "status": "completed",
        "subcommand": "bon",
        "output_dir": str(out),
        "policy": str(policy),
        "reward_model": str(reward_model),
        "prompts": len(conversations),
        "prompts_scored": len(kept),
        "prompts_skipped": len(rewards) - len(kept),
        "table": rows,
        "results": str(out / "results.json"),
        "plot": png,
    }


# ---------------------------------------------------------------------------------------------- policy
def _sampling(args) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "template": args.template or "tokenizer",
    }


def run_policy(args) -> dict:
    from starling_jax.eval import mtbench, plots
    from starling_jax.eval import policy as pol

    pol.check_models(args.model)
    kind, name = pol.parse_judge(args.judge)
    fmt, prompt_rows = pol.read_prompt_rows(args.prompts)
    if fmt == "mtbench" and kind != "openai":
        raise ConfigError(f"--judge {args.judge}: MT-Bench questions are graded 1-10 by an openai:MODEL judge")
    out = _out_dir(args, "policy")
    judge = None
    if kind == "openai":
        from starling_jax.judge.openai_judge import OpenAIJudge

        judge = OpenAIJudge(
            name, args.base_url, timeout=args.timeout, max_retries=args.max_retries, backoff_s=args.backoff
        )
    table_rows, per_example = [], []
    if fmt == "mtbench":
        for m, model in enumerate(args.model):
            first = pol.generate_answers(
                model,
                [[{"role": "user", "content": q.turns[0]}] for q in prompt_rows],
                out / f"answers_{m}_turn1.jsonl",
                _sampling(args),
            )
            second = pol.generate_answers(
                model,
                [
                    [
                        {"role": "user", "content": q.turns[0]},
                        {"role": "assistant", "content": a[0]},
                        {"role": "user", "content": q.turns[1]},
                    ]
                    for q, a in zip(prompt_rows, first)
                ],
                out / f"answers_{m}_turn2.jsonl",
                _sampling(args),
            )
            answers = [(a[0], b[0]) for a, b in zip(first, second)]
            graded = pol.grade_mtbench(judge, prompt_rows, answers, args.concurrency)
            per_example += [{"model": model, **g} for g in graded]
            s = mtbench.scores(graded)
            table_rows.append(
                {
                    "model_name": model,
                    "prompts": len(prompt_rows),
                    "mtbench_score": s["score"],
                    "mtbench_turn_1": s["turn_1"],
                    "mtbench_turn_2": s["turn_2"],
                    "mtbench_categories": s["categories"],
                    "rated": s["rated"],
                    "skipped": s["unrated"],
                    "mean_length": sum(len(a) + len(b) for a, b in answers) / (2 * len(answers)),
                }
            )
    else:
        conversations = [conv for conv, _ in prompt_rows]
        if args.reference_answers:
            references = pol.read_reference_answers(args.reference_answers, len(conversations))
        elif all(ref is not None for _, ref in prompt_rows):
            references = [ref for _, ref in prompt_rows]
        elif any(ref is not None for _, ref in prompt_rows):
            missing = next(i + 1 for i, (_, ref) in enumerate(prompt_rows) if ref is None)
            raise ConfigError(
                f"--prompts {args.prompts}: row {missing} has no reference answer while others do "
                "(give every row one, or --reference-answers FILE)"
            )
        else:
            references = None
        if references is None and kind == "openai":
            raise ConfigError(
                "--judge openai:...: a win rate needs reference answers (--reference-answers FILE or "
                "a 'reference'/'output' field in --prompts)"
            )
        answers = [
            [a[0] for a in pol.generate_answers(model, conversations, out / f"answers_{m}.jsonl", _sampling(args))]
            for m, model in enumerate(args.model)
        ]
        if kind == "rm":
            # one reward-model pass over every answer of a prompt: the reference first, then each model's
            per_prompt = [
                ([references[i]] if references else []) + [a[i] for a in answers] for i in range(len(conversations))
            ]
            rewards = pol.rm_rewards(name, conversations, per_prompt, args.judge, args.max_length)
        offset = 1 if references else 0
        for m, model in enumerate(args.model):
            mine = answers[m]
            row = {
                "model_name": model,
                "prompts": len(conversations),
                "mean_length": sum(len(a) for a in mine) / len(mine),
            }
            if kind == "rm":
                prefs, rewards_m = [], []
                for i, r in enumerate(rewards):
                    if isinstance(r, str):
                        prefs.append(r)
                        rewards_m.append(None)
                        continue
                    rewards_m.append(r[offset + m])
                    prefs.append(1.0 if r[offset + m] > r[0] else 0.5 if r[offset + m] == r[0] else 0.0)
                scored = [x for x in rewards_m if x is not None]
                row["mean_reward"] = sum(scored) / len(scored) if scored else None
                if references:
                    row["mean_reference_reward"] = sum(r[0] for r in rewards if not isinstance(r, str)) / max(
                        1, len(scored)
                    )
            else:
                prefs = pol.openai_preferences(
                    judge, args.judge, conversations, mine, references, out / "judge_cache.jsonl", args.concurrency
                )
                rewards_m = [None] * len(mine)
            if references:
                row.update(pol.preference_row(prefs, mine, references))
            row["skipped"] = sum(isinstance(p, str) for p in prefs) if (references or kind == "rm") else 0
            for i, a in enumerate(mine):
                p = prefs[i] if (references or kind == "rm") else None
                per_example.append(
                    {
                        "model": model,
                        "row": i + 1,
                        "answer_chars": len(a),
                        "reward": rewards_m[i],
                        "reference_chars": len(references[i]) if references else None,
                        "preference": p if (isinstance(p, float) and references) else None,
                        **({"error": p} if isinstance(p, str) else {}),
                    }
                )
            table_rows.append(row)
    _write_jsonl(out / "judgements.jsonl", per_example)
    (out / "results.json").write_text(json.dumps(table_rows, indent=1) + "\n")
    pol.print_table(pol.comparison_table(table_rows))
    png = _plot(not args.no_plot, plots.policy_png, table_rows, out / "policy.png", f"{args.prompts} ({args.judge})")
    summary = {
        "status": "completed",
        "subcommand": "policy",
        "output_dir": str(out),
        "judge": args.judge,
        "format": fmt,
        "prompts": len(prompt_rows),
        "models": table_rows,
        "results": str(out / "results.json"),
        "judgements": str(out / "judgements.jsonl"),
        "plot": png,
    }
    if judge is not None:
        summary["usage"] = {
            k: getattr(judge.usage, k) for k in ("requests", "retries", "prompt_tokens", "completion_tokens")
        }
    return summary


# ---------------------------------------------------------------------------------------------- main
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default=None, help="where the outputs go (default runs/eval/SUBCOMMAND)")
    p.add_argument("--template", default=None, help="chat template (default: each model folder's own)")
    p.add_argument("--max-length", type=int, default=None, help="reward model: tokens per sequence")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")


def _sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per sampler batch")


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m starling_jax.evaluate",
        description=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    rb = sub.add_parser("rewardbench", help="RewardBench v1 scores of a reward model or a DPO policy")
    rb.add_argument(
        "--model",
        default=None,
        help="reward model (HF folder / Hub id / checkpoint) or, with "
        f"--reference, a DPO policy (default: {cli.DEFAULT_HF_DIR})",
    )
    rb.add_argument("--reference", default=None, help="reference policy of a DPO --model: implied rewards")
    rb.add_argument(
        "--beta", type=float, default=0.1, help="DPO β of the implied rewards (ranking does not depend on it)"
    )
    rb.add_argument(
        "--data", default="allenai/reward-bench", help="local json/jsonl/parquet file or Hub id (split 'filtered')"
    )
    rb.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    rb.add_argument(
        "--on-bad-row",
        choices=("error", "skip"),
        default="error",
        help="a row with an unknown subset or a missing field: one-line error, or a counted skip",
    )
    _common(rb)

    bn = sub.add_parser("bon", help="best-of-n reward vs n with the analytic KL")
    bn.add_argument(
        "--policy", default=None, help="causal-LM folder or checkpoint (default: the embedded train_sft run's export)"
    )
    bn.add_argument("--reward-model", default=None, help=f"reward model (default: {cli.DEFAULT_HF_DIR})")
    bn.add_argument("--n", default="1,2,4,8", help="comma-separated n's")
    bn.add_argument("--prompts", default=None, help="prompt file (default: a few held-out bundled prompts)")
    _sampling_flags(bn, 64, 1.0)
    _common(bn)

    po = sub.add_parser("policy", help="judged win rates (and MT-Bench) of one or more policies")
    po.add_argument("--model", action="append", default=[], help="policy folder or checkpoint (repeatable)")
    po.add_argument("--prompts", required=True, help="prompt file, or an MT-Bench question file (rows with turns)")
    po.add_argument("--judge", required=True, help="rm:DIR or openai:MODEL")
    po.add_argument(
        "--reference-answers",
        default=None,
        help="reference answers, in prompt order (generate output or rows with output/answer)",
    )
    po.add_argument("--base-url", default=None, help="openai: an OpenAI-compatible server (default OpenAI's)")
    po.add_argument("--concurrency", type=int, default=4, help="openai: requests in flight")
    po.add_argument("--timeout", type=float, default=120.0, help="openai: seconds per request")
    po.add_argument("--max-retries", type=int, default=6, help="openai: retries of a failed request")
    po.add_argument("--backoff", type=float, default=1.0, help="openai: first retry delay (s)")
    _sampling_flags(po, 256, 0.7)
    _common(po)
    return parser


def main(argv=None) -> int:
    parser = build_parser()

    def run():
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # usage errors: one line
        cli.setup_logging()
        return {"rewardbench": run_rewardbench, "bon": run_bon, "policy": run_policy}[args.command](args)

    return cli.run_main(run)


if __name__ == "__main__":
    cli.without_torch()
    sys.exit(main())
