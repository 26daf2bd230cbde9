"""`evaluate policy` and `evaluate bon`: generate answers with the sampler, judge them with the `label` judges.

Prompt files (JSON lines / json / parquet), one prompt per row: `messages` (role/content list), `prompt` (Nectar HH
text or a plain user message) or `instruction` (AlpacaEval); a row may carry its reference answer as `reference`,
`output` (AlpacaEval's baseline outputs) or `answer`. A file whose rows have `turns` is an MT-Bench question file
(`mtbench.py`). `--reference-answers FILE`: answers matched to the prompts by order: `generate` output (`completion`
of sample 0 per `row`) or rows with `output` / `answer` / `reference`.

Judges (`label`'s backends):
- `rm:DIR`: rewards of the reward model (`eval.scorer.RewardScorer`, via `judge.rm_judge`); the preference of an answer
  over its reference is 1 / 0.5 / 0 as its reward is higher / equal / lower; the mean reward is reported too.
- `openai:MODEL`: the Nectar ranking prompt of `label` on the two answers, asked in both orders (position bias
  cancels; Borda aggregation), preference from the ranks; rows the judge does not answer are counted and reported.
  MT-Bench files: single-answer grading 1–10 of both turns (`mtbench.py`).
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from starling_jax.data.chat import parse_hh
from starling_jax.data.nectar import iter_raw_rows
from starling_jax.data.prompts import parse_messages
from starling_jax.errors import ConfigError, DataError
from starling_jax.eval import mtbench, winrate

REFERENCE_FIELDS = ("reference", "output", "answer")


# ---------------------------------------------------------------------------------------------- inputs
def _conversation(raw: dict, where: str) -> list[dict]:
    if "messages" in raw:
        return parse_messages(raw["messages"], where)
    for field in ("prompt", "instruction"):
        if isinstance(raw.get(field), str) and raw[field].strip():
            text = raw[field]
            if field == "instruction" and isinstance(raw.get("input"), str) and raw["input"].strip():
                text = f"{text}\n\n{raw['input']}"
            if "\n\nHuman:" in text or text.lstrip().startswith("Human:"):
                try:
                    return parse_hh(text)
                except ValueError as e:
                    raise DataError(f"{where}: field {field!r}: {e}") from None
            return [{"role": "user", "content": text}]
    raise DataError(f"{where}: no 'messages', 'prompt' or 'instruction' field")


def _reference(raw: dict) -> str | None:
    for field in REFERENCE_FIELDS:
        if isinstance(raw.get(field), str):
            return raw[field]
    return None


def read_prompt_rows(path: str) -> tuple[str, list]:
    """→ ("mtbench", [Question]) or ("single", [(conversation, reference answer or None)])."""
    raws = list(iter_raw_rows(path))
    if not raws:
        raise DataError(f"{path}: no rows")
    if any(mtbench.is_mtbench_row(raw) for _, raw in raws):
        return "mtbench", mtbench.read_questions(path)
    rows = []
    for row, raw in raws:
        where = f"{path}: row {row}"
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object")
        rows.append((_conversation(raw, where), _reference(raw)))
    return "single", rows


def read_reference_answers(path: str, count: int) -> list[str]:
    """Reference answers by prompt order: `generate` output (sample 0 of each row) or rows with output/answer."""
    answers = []
    for row, raw in iter_raw_rows(path):
        where = f"{path}: row {row}"
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object")
        if "completion" in raw:
            if raw.get("sample", 0) == 0:
                answers.append(str(raw["completion"]))
            continue
        text = _reference(raw)
        if text is None:
            raise DataError(f"{where}: no 'completion', 'output', 'answer' or 'reference' field")
        answers.append(text)
    if len(answers) != count:
        raise DataError(
            f"{path}: {len(answers)} reference answers for {count} prompts (--reference-answers must "
            "follow the prompt file's order, one answer per prompt)"
        )
    return answers


def parse_judge(spec: str) -> tuple[str, str]:
    from starling_jax.judge.spec import parse_judge as label_parse  # the same specs as label

    return label_parse(spec)


# ---------------------------------------------------------------------------------------------- generation
def generate_answers(
    model: str, conversations: list[list[dict]], output: Path, sampling: dict, num_samples: int = 1
) -> list[list[str]]:
    """The sampler's completions (`generate.generate`, written to `output`): [prompt][sample]."""
    from starling_jax.sample.chat import generate

    generate(model, conversations, output=str(output), num_samples=num_samples, **sampling)
    out: list[list[str]] = [[] for _ in conversations]
    for line in output.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        out[item["row"] - 1].append(item["completion"])
    return out


# ---------------------------------------------------------------------------------------------- judging
def rm_rewards(
    judge_model: str,
    conversations: list[list[dict]],
    answers: list[list[str]],
    judge_spec: str,
    max_length: int | None = None,
) -> list[list[float] | str]:
    """Reward of every answer (the `rm:` judge's rewards); per prompt a list, or the reason it was not scored."""
    from starling_jax.judge.rm_judge import label_rows_rm
    from starling_jax.judge.rows import Row

    rows = []
    for i, (conv, ans) in enumerate(zip(conversations, answers)):
        prompt = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in conv)
        rows.append(
            Row(
                row=i + 1,
                prompt=prompt + "\n\nAssistant:",
                answers=tuple(ans),
                models=tuple(str(k) for k in range(len(ans))),
                extra={},
            )
        )
    labelled, rejected, _ = label_rows_rm(rows, judge_model, judge_spec, max_length=max_length)
    out: list[Any] = [None] * len(rows)
    for row, _, record in labelled:
        out[row.row - 1] = record["rewards"]
    for r in rejected:
        out[r["row"] - 1] = r["reason"]
    return out


def openai_preferences(
    judge, judge_spec: str, conversations, answers: list[str], references: list[str], cache_path: Path, concurrency: int
) -> list[float | str]:
    """Preference of each answer over its reference by the `label` LLM judge (both orders, Borda); or the reason a
    row was not judged."""
    from starling_jax.judge.cache import Cache
    from starling_jax.judge.llm import label_rows
    from starling_jax.judge.prompt import load_template
    from starling_jax.judge.rows import Row

    rows = []
    for i, (conv, ans, ref) in enumerate(zip(conversations, answers, references)):
        prompt = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in conv)
        rows.append(
            Row(
                row=i + 1, prompt=prompt + "\n\nAssistant:", answers=(ans, ref), models=("model", "reference"), extra={}
            )
        )
    store = Cache(str(cache_path))
    try:
        labelled, rejected, _ = label_rows(
            rows,
            judge,
            judge_spec,
            load_template(None),
            store,
            orders=2,
            seed=0,
            fixed_order=False,
            concurrency=concurrency,
            max_attempts=2,
        )
    finally:
        store.close()
    out: list[Any] = [None] * len(rows)
    for row, ranks, _ in labelled:
        out[row.row - 1] = 1.0 if ranks[0] < ranks[1] else 0.5 if ranks[0] == ranks[1] else 0.0
    for r in rejected:
        out[r["row"] - 1] = f"judge did not answer: {r['reason']}"
    return out


def grade_mtbench(judge, questions: list, answers: list[tuple[str, str]], concurrency: int) -> list[dict]:
    """Both turns of every question graded 1–10; a judge failure or a reply without a rating is kept with the
    reason (never averaged)."""
    from starling_jax.judge.openai_judge import TransportError

    jobs = [(q, a, turn) for q, a in zip(questions, answers) for turn in (1, 2)]

    def ask(job):
        q, a, turn = job
        base = {"question_id": q.question_id, "category": q.category, "turn": turn}
        try:
            reply = judge.complete(mtbench.judge_messages(q, a, turn))
        except TransportError as e:
            return {**base, "rating": None, "error": f"judge did not answer: {e}"}
        rating = mtbench.parse_rating(reply)
        return {
            **base,
            "rating": rating,
            "judgment": reply,
            **({} if rating is not None else {"error": "no [[rating]] in the judge's reply"}),
        }

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(ask, jobs))


# ---------------------------------------------------------------------------------------------- tables
def comparison_table(rows: list[dict]) -> str:
    """One line per model: what was measured (win rates, mean reward, MT-Bench score), mean length, skips."""

    def f(x, width, digits=2):
        return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"

    head = f"{'model':<28} {'n':>4} {'win %':>7} {'LC win %':>8} {'reward':>8} {'MT-Bench':>8} {'len':>7} {'skip':>4}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['model_name'][-28:]:<28} {r['prompts']:>4} {f(r.get('win_rate'), 7)} "
            f"{f(r.get('length_controlled_win_rate'), 8)} {f(r.get('mean_reward'), 8, 3)} "
            f"{f(r.get('mtbench_score'), 8)} {f(r.get('mean_length'), 7, 0)} {r.get('skipped', 0):>4}"
        )
    return "\n".join(lines)


def print_table(text: str) -> None:
    """Tables go to stderr: stdout's last line is the JSON summary."""
    print(text, file=sys.stderr, flush=True)


def check_models(models: list[str]) -> None:
    if not models:
        raise ConfigError("--model: give at least one policy (repeat --model to compare several)")


def preference_row(prefs: list, answers: list[str], references: list[str]) -> dict:
    """Win rate, LC win rate (AlpacaEval 2), counts from per-prompt preferences (floats or skip reasons)."""
    kept = [i for i, p in enumerate(prefs) if isinstance(p, float)]
    lc = winrate.length_controlled_win_rate(
        [prefs[i] for i in kept], [len(answers[i]) for i in kept], [len(references[i]) for i in kept]
    )
    return {
        "win_rate": lc["win_rate"],
        "length_controlled_win_rate": lc["length_controlled_win_rate"],
        "lc_theta": lc["theta"],
        "lc_gamma": lc["gamma"],
        "judged": len(kept),
        "mean_reference_length": (sum(len(r) for r in references) / len(references)) if references else None,
    }
