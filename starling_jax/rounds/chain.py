"""On-policy preference data in rounds: the policy's K samples on the RL prompts → `label` (a reward model or an LLM
judge) → `train_dpo` (and/or a continued `train_rm`) → the next round, from the policy the round trained.

Each stage calls the library function its entry point runs, in this process: `sample.chat.generate` (`generate
--num-samples K`), `judge.gather.gather` (`gather_answers --dedupe`), `judge.labelling.label` (`label`),
`train.dpo_job.train_dpo` (`train_dpo`), `train.rm_job.train_reward_model` (`train_rm` with `init_from`), and the
held-out reward as `evaluate bon` measures it (`eval.policy`: K samples per held-out prompt, scored by the reward
model). Outputs, per round N in `output_dir/round_N/`:

    prompts.jsonl, samples.jsonl     the round's prompts (Nectar rows) and the policy's K samples (generate's lines)
    unranked.jsonl                   unranked Nectar-schema rows (gather_answers)
    labelled.jsonl                   Nectar rows ranked by the judge (label; with rm:, each row's `rewards`)
    dpo/, rm/                        the train_dpo / train_rm runs (checkpoints, metrics, hf/)
    eval.jsonl                       the round's policy's answers to the held-out prompts, with their rewards
    <stage>.summary.json             each stage's JSON summary

`round_0/` holds the starting policy's held-out reward. A stage is done when its output and its summary exist and
every stage before it was done; a restarted chain (the same config; `rounds` may grow) reuses those and runs from the
first stage that is not, and every stage after it again (a killed `train_dpo` / `train_rm` resumes from its last
checkpoint). A training stage that was preempted (SIGTERM) ends the chain with status `preempted`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import OmegaConf

from starling_jax.config import save_config, to_dict
from starling_jax.data.chat import to_hh
from starling_jax.data.prompts import read_prompts
from starling_jax.data.synthetic import resolve_bundled
from starling_jax.errors import ConfigError, DataError
from starling_jax.rounds.config import OnPolicyConfig
from starling_jax.rounds.heldout import heldout_reward, sampling_args

log = logging.getLogger("starling_jax")
RESUMABLE_KEYS = ("rounds",)  # a restarted chain may change these; any other change is refused


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)  # a killed chain never leaves a half-written summary


class Stages:
    """Runs stages in order: a stage whose output and summary exist is reused while every stage before it was;
    from the first one that runs, every later stage runs too."""

    def __init__(self):
        self.fresh = False  # a stage ran: every later one runs
        self.ran: list[str] = []
        self.reused: list[str] = []

    def __call__(self, name: str, output: Path, summary: Path, fn: Callable[[], dict]) -> dict:
        if not self.fresh and output.exists() and summary.is_file():
            self.reused.append(name)
            return read_json(summary)
        self.fresh = True
        summary.unlink(missing_ok=True)  # not done until it is written again
        log.info("on-policy stage %s", name)
        start = time.perf_counter()
        result = fn()
        result["seconds"] = round(time.perf_counter() - start, 1)
        if result.get("status", "completed") == "completed":
            write_json(summary, result)
        self.ran.append(name)
        return result


def check_restart(cfg: OnPolicyConfig, out: Path) -> None:
    """A restarted chain must have the config its finished stages were made with (`rounds` aside)."""
    saved = out / "config.yaml"
    if not saved.is_file():
        return
    old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    new = to_dict(cfg)
    for key in RESUMABLE_KEYS:
        old.pop(key, None)
        new.pop(key, None)

    def first_difference(a, b, prefix=""):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in list(a) + [k for k in b if k not in a]:
                found = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
                if found:
                    return found
            return None
        return prefix.rstrip(".") if a != b else None

    key = first_difference(old, new)
    if key:
        raise ConfigError(
            f"output_dir={cfg.output_dir} holds a chain made with another config ({key}: "
            f"{OmegaConf.select(OmegaConf.create(old), key)!r} there); pass that value, or choose another output_dir"
        )


def split_prompts(cfg: OnPolicyConfig) -> tuple[list, list[int], list[list[int]]]:
    """→ (the distinct conversations, held-out rows, the rows of each round): a seeded order; the first
    `eval_prompts` are held out, the rest are taken `per_round` at a time (from the start again when they run out)."""
    read = read_prompts(resolve_bundled(cfg.prompts.train))
    # each distinct prompt once: answers are joined by prompt text, and a held-out prompt must not be sampled
    conversations = list({json.dumps(conv, sort_keys=True): conv for conv in read}.values())
    order = np.random.default_rng(cfg.seed).permutation(len(conversations)).tolist()
    p = cfg.prompts
    if len(order) <= p.eval_prompts:
        raise DataError(
            f"{p.train}: {len(order)} distinct prompts leave none to sample after prompts.eval_prompts={p.eval_prompts}"
        )
    held_out, pool = sorted(order[: p.eval_prompts]), order[p.eval_prompts :]
    rounds = [
        [pool[(r * p.per_round + j) % len(pool)] for j in range(min(p.per_round, len(pool)))] for r in range(cfg.rounds)
    ]
    return conversations, held_out, rounds


def write_prompts(path: Path, conversations: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for conv in conversations:
            if any(m["role"] == "system" for m in conv):
                raise DataError(f"{path}: a prompt with a system message cannot be written as a Nectar HH prompt")
            f.write(json.dumps({"prompt": to_hh(conv)}, ensure_ascii=False) + "\n")


def run_rounds(cfg: OnPolicyConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={cfg.output_dir}: a file, not a folder; choose another output_dir")
    check_restart(cfg, out)
    conversations, held_out, round_rows = split_prompts(cfg)
    # the stages' libraries load JAX: imported once the config and the prompts are known to be good
    from starling_jax.judge.gather import gather
    from starling_jax.judge.labelling import label
    from starling_jax.sample.chat import generate
    from starling_jax.train.dpo_job import train_dpo
    from starling_jax.train.rm_job import train_reward_model

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    stages = Stages()
    eval_convs = [conversations[i] for i in held_out]

    start_dir = out / "round_0"
    start_dir.mkdir(exist_ok=True)
    start = stages(
        "round_0/eval",
        start_dir / "eval.jsonl",
        start_dir / "eval.summary.json",
        lambda: heldout_reward(cfg, cfg.policy, eval_convs, start_dir),
    )
    policy, reward_model = cfg.policy, cfg.reward_model
    results, status = [], "completed"
    for r, rows in enumerate(round_rows, start=1):
        d = out / f"round_{r}"
        d.mkdir(exist_ok=True)
        result: dict[str, Any] = {"round": r, "policy": str(policy), "judge": cfg.judge, "dir": str(d)}
        prompts_file, samples_file = d / "prompts.jsonl", d / "samples.jsonl"

        def sample(policy=policy, rows=rows, r=r, prompts_file=prompts_file, samples_file=samples_file):
            convs = [conversations[i] for i in rows]
            write_prompts(prompts_file, convs)
            summary = generate(
                policy,
                convs,
                output=str(samples_file),
                num_samples=cfg.sampling.num_samples,
                seed=cfg.seed + r,
                **sampling_args(cfg),
            )
            return {**summary, "prompt_rows": [i + 1 for i in rows]}

        sampled = stages(f"round_{r}/samples", samples_file, d / "samples.summary.json", sample)
        name = str(policy) if "=" not in str(policy) else f"round_{r}_policy"  # gather's FILE=MODEL spec
        gathered = stages(
            f"round_{r}/unranked",
            d / "unranked.jsonl",
            d / "unranked.summary.json",
            lambda: gather(
                str(d / "unranked.jsonl"),
                str(prompts_file),
                generated=[f"{samples_file}={name}"],
                dedupe=cfg.sampling.dedupe,
            ),
        )
        labelled_file = d / "labelled.jsonl"
        lab = cfg.label
        labelled = stages(
            f"round_{r}/labelled",
            labelled_file,
            d / "labelled.summary.json",
            lambda: label(
                str(d / "unranked.jsonl"),
                str(labelled_file),
                cfg.judge,
                base_url=lab.base_url,
                judge_template=lab.judge_template,
                orders=lab.orders,
                seed=cfg.seed + r,
                concurrency=lab.concurrency,
                max_length=lab.max_length,
                progress=False,
            ),
        )
        result.update(
            samples=sampled["rows"],
            rows_unranked=gathered["rows"],
            rows_labelled=labelled["labelled"],
            rows_rejected=labelled["rejected"],
        )
        if labelled["labelled"] == 0:
            raise DataError(f"{labelled_file}: the judge labelled no row of round {r} (see {labelled['rejects']})")
        if "dpo" in cfg.update:
            dpo_cfg = dataclasses.replace(
                cfg.dpo,
                output_dir=str(d / "dpo"),
                policy=str(policy),
                data=dataclasses.replace(cfg.dpo.data, train=str(labelled_file)),
            )
            dpo = stages(
                f"round_{r}/dpo", d / "dpo" / "hf" / "config.json", d / "dpo.summary.json", lambda: train_dpo(dpo_cfg)
            )
            if dpo["status"] != "completed":
                status = dpo["status"]
                results.append({**result, "dpo_status": status})
                break
            policy = dpo["hf_export_dir"]
            result.update(
                dpo_pairwise_accuracy_start=dpo.get("eval_pairwise_accuracy_start"),
                dpo_pairwise_accuracy_end=dpo.get("eval_pairwise_accuracy_end"),
                dpo_dir=dpo["output_dir"],
            )
        if "rm" in cfg.update:
            rm_cfg = dataclasses.replace(
                cfg.rm,
                output_dir=str(d / "rm"),
                init_from=str(reward_model),
                data=dataclasses.replace(cfg.rm.data, train=str(labelled_file)),
            )
            rm = stages(
                f"round_{r}/rm",
                d / "rm" / "hf" / "config.json",
                d / "rm.summary.json",
                lambda: train_reward_model(rm_cfg),
            )
            if rm["status"] != "completed":
                status = rm["status"]
                results.append({**result, "rm_status": status})
                break
            reward_model = rm["hf_export_dir"]
            result.update(
                rm_pairwise_accuracy=rm.get("eval_pairwise_accuracy"),
                rm_init_from=rm_cfg.init_from,
                rm_dir=rm_cfg.output_dir,
            )
        evaluated = stages(
            f"round_{r}/eval",
            d / "eval.jsonl",
            d / "eval.summary.json",
            lambda: heldout_reward(cfg, policy, eval_convs, d),
        )
        result.update(policy_out=str(policy), heldout_reward=evaluated["heldout_reward"])
        if "rm" in cfg.update:
            result["reward_model_out"] = str(reward_model)
        results.append(result)
    return {
        "status": status,
        "output_dir": str(out),
        "rounds": results,
        "start_heldout_reward": start["heldout_reward"],
        "heldout_prompts": len(eval_convs),
        "reward_model": cfg.reward_model,
        "final_policy": str(policy),
        "final_reward_model": str(reward_model),
        "stages_run": stages.ran,
        "stages_reused": len(stages.reused),
    }
