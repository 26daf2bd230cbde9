"""Score every answer of a Nectar-format (or RewardBench pairwise) file with a reward model.

    python -m starling_jax.score --model DIR --data FILE [--output FILE] [--template NAME]
                                 [--max-length N] [--batch-size N] [--on-bad-row error|skip]

DIR is an HF `*ForSequenceClassification` folder (or a Starling `v_head` folder) or a starling_jax checkpoint.
By default each conversation (the parsed prompt turns plus the answer as the last assistant turn) is rendered
with the format the model was trained with (a checkpoint's recorded template; an HF folder's chat_template) and the
reward is read at the last token of that rendering.
Output: JSON lines, one per input row in input order, with `rewards` in the order of the row's `answers`
(skipped rows carry `rewards: null` and the reason). The last printed line is a JSON summary with ranking
metrics against the given ranks; pairwise files (`prompt`/`chosen`/`rejected`) report their `accuracy`.
All answers are scored in length-sorted micro-batches of `--batch-size` sequences, each padded to one of a few
bucket lengths (`score_batches.py`), so short answers are not padded to the longest and few programs compile.

DPO models score like reward models (as RewardBench scores them):

    python -m starling_jax.score --model POLICY --reference REF [--beta B] --data FILE ...

POLICY and REF are HF `*ForCausalLM` folders (a `train_dpo` export and its starting policy); the reward of an
answer is its implied reward β · Σ_t (log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)) over the answer's tokens
(the answer text and the template's end of turn), rendered in POLICY's chat format. β defaults to the one a
`train_dpo` export records (`dpo_beta` in its config.json), else 0.1.
"""

from __future__ import annotations

import json
import sys

from starling_jax import cli
from starling_jax.data.bundled import BUNDLED_ALIAS, resolve_bundled
from starling_jax.data.chat import TEMPLATE_NAMES
from starling_jax.data.nectar import ReadReport, iter_raw_rows, read_pairwise, read_rankings
from starling_jax.errors import CheckpointError, DataError, UsageError
from starling_jax.paths import as_path


def detect_format(path: str) -> str:
    for _, raw in iter_raw_rows(path):
        if isinstance(raw, dict):
            return "pairwise" if "chosen" in raw and "rejected" in raw and "answers" not in raw else "nectar"
    return "nectar"


def score(
    model: str,
    data: str,
    output: str | None = None,
    template: str | None = None,
    max_length: int | None = None,
    batch_size: int = 32,
    on_bad_row: str = "error",
) -> dict:

    # JAX, the model and the tokenizer load here, not at import: `score --help` and flag errors stay instant
    from starling_jax.eval.scorer import RewardScorer

    # --- inputs first: a missing or unreadable --data fails before any model is loaded
    fmt = detect_format(data)
    scorer = RewardScorer(model, template, max_length, batch_size)
    template = scorer.template

    tokenized, lines, report = tokenize_rows(data, fmt, on_bad_row, scorer.tokenize)
    # every answer in length-sorted micro-batches padded to a few bucket lengths (score_batches.py)
    rewards = scorer.rewards(tokenized)
    return report_rewards(
        tokenized,
        rewards,
        lines,
        report,
        output,
        {"model": str(model), "data": str(data), "format": fmt, "template": template},
    )


def tokenize_rows(data: str, fmt: str, on_bad_row: str, tokenize):
    """The file's rows → (tokenized rows in input order, {row: output line} of the skipped ones with their reason,
    the read report). `tokenize`: a `Ranking` → its `TokenizedRanking` (raises RowDoesNotFit)."""
    from starling_jax.data.tokenize import RowDoesNotFit  # numpy: not at import (`--help` stays instant)

    report = ReadReport()
    reader = read_pairwise if fmt == "pairwise" else read_rankings
    lines: dict[int, dict] = {}
    tokenized = []
    for ranking in reader(data, on_bad_row, report):
        try:
            tokenized.append(tokenize(ranking))
        except RowDoesNotFit as e:
            if on_bad_row == "error":
                raise DataError(f"{data}: row {ranking.row}: {e}") from None
            lines[ranking.row] = {"row": ranking.row, "rewards": None, "error": str(e)}
    for skipped in report.skipped:
        lines[skipped["row"]] = {"row": skipped["row"], "rewards": None, "error": skipped["reason"]}
    return tokenized, lines, report


def report_rewards(tokenized, rewards, lines: dict, report, output: str | None, head: dict) -> dict:
    """Rewards per tokenized row → the output file (one JSON line per input row, in row order) and the summary:
    `head` (model, data, format, template, ...), the row counts and the ranking metrics."""
    import numpy as np

    from starling_jax.eval.metrics import RankingMetrics  # JAX-free, but with numpy: not needed for --help

    metrics = RankingMetrics()
    for tr, rw in zip(tokenized, rewards):
        lines[tr.row] = {
            "row": tr.row,
            "rewards": [float(x) for x in rw],
            "ranks": [float(x) for x in tr.ranks],
            "truncated": tr.truncated,
        }
        metrics.update(rw[None], tr.ranks[None], np.ones((1, tr.num_answers), bool), tr.answer_lengths[None])
    if output:
        as_path(output).parent.mkdir(parents=True, exist_ok=True)
        with as_path(output).open("w", encoding="utf-8") as f:
            for row in sorted(lines):
                f.write(json.dumps(lines[row]) + "\n")
    computed = metrics.compute() if tokenized else {}
    fmt = head["format"]
    summary = {
        "status": "completed",
        **head,
        "rows_read": report.rows_read,
        "rows_scored": len(tokenized),
        "rows_skipped": len(lines) - len(tokenized),
        "rows_truncated": sum(tr.truncated for tr in tokenized),
        "output": output,
    }
    if fmt == "pairwise":
        summary["accuracy"] = computed.get("pairwise_accuracy")
    summary.update({k: v for k, v in computed.items() if k != "num_pairs" or fmt == "nectar"})
    return summary


def check_flags(args) -> None:
    """The flags' values, checked before the model is loaded (`UsageError` naming the flag as typed)."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1 (sequences per forward pass)")
    if args.max_length is not None and args.max_length < 8:
        raise UsageError(f"--max-length {args.max_length}: must be at least 8 tokens (prompt + answer)")
    if args.template is not None and args.template not in TEMPLATE_NAMES:
        raise UsageError(f"--template {args.template}: choose one of {', '.join(TEMPLATE_NAMES)}")


DEFAULT_DPO_BETA = 0.1  # trl's DPOConfig default, for a policy that records none


def score_dpo(
    model: str,
    reference: str,
    data: str,
    output: str | None = None,
    template: str | None = None,
    max_length: int | None = None,
    batch_size: int = 32,
    on_bad_row: str = "error",
    beta: float | None = None,
) -> dict:
    """Implied rewards of a DPO policy against its reference for every answer (the output and summary of
    `score`, plus `reference` and `beta`)."""
    import numpy as np

    # JAX, the models and the tokenizer load here, not at import (as in `score`)
    from starling_jax import hub
    from starling_jax.data import tokenizer as tokenizer_lib
    from starling_jax.data.tokenize import tokenize_ranking
    from starling_jax.eval.score_batches import ImpliedRewards
    from starling_jax.eval.scorer import PAD_TO_MULTIPLE
    from starling_jax.model import hf_io
    from starling_jax.parallel import sharding

    fmt = detect_format(data)  # a missing or unreadable --data fails before any model is loaded
    mesh = sharding.make_mesh(sharding.MeshConfig())
    folder = hub.resolve(model, key="--model")
    ref_folder = hub.resolve(reference, key="--reference")
    cfg, graphdef, params = hf_io.load_hf(folder, "causal_lm", mesh)
    ref_cfg, ref_graphdef, ref_params = hf_io.load_hf(ref_folder, "causal_lm", mesh)
    if ref_cfg.vocab_size != cfg.vocab_size:
        raise CheckpointError(
            f"--reference {reference}: vocabulary of {ref_cfg.vocab_size} tokens, the policy "
            f"--model {model} has {cfg.vocab_size}: not its reference"
        )
    config = hf_io.read_hf_config(folder)
    if beta is None:
        beta = float(config.get("dpo_beta") or DEFAULT_DPO_BETA)
    if beta <= 0:
        raise UsageError(f"--beta {beta}: must be positive")
    tokenizer = tokenizer_lib.load_tokenizer(folder)
    recorded = config.get("starling_jax_data") or {}
    max_length = max_length or int(recorded.get("max_length") or 2048)
    keys = ["tokenizer_fingerprint"] + (["template"] if template and template != "tokenizer" else [])
    template = template or "tokenizer"
    current = tokenizer_lib.data_provenance(tokenizer, folder, template, max_length)
    tokenizer_lib.check_provenance(recorded, current, f"policy {model}", "score", keys=keys)
    if (ref_folder / "tokenizer_config.json").is_file():
        ref_tok = tokenizer_lib.load_tokenizer(ref_folder)
        if tokenizer_lib.tokenizer_fingerprint(ref_tok) != tokenizer_lib.tokenizer_fingerprint(tokenizer):
            raise CheckpointError(
                f"--reference {reference}: its tokenizer differs from the policy's ({model}); "
                "implied rewards need one tokenization"
            )
    common = dict(
        rows=batch_size, max_length=max_length, pad_to_multiple=PAD_TO_MULTIPLE, pad_id=tokenizer.pad_token_id or 0
    )
    implied_rewards = ImpliedRewards(graphdef, ref_graphdef, mesh, beta, **common)

    tokenized, lines, report = tokenize_rows(
        data, fmt, on_bad_row, lambda ranking: tokenize_ranking(ranking, tokenizer, template, max_length)
    )

    sequences = [t for tr in tokenized for t in tr.tokens]
    starts = [int(i) for tr in tokenized for i in tr.answer_start]
    flat = implied_rewards(params, ref_params, sequences, starts)
    offsets = np.cumsum([0] + [tr.num_answers for tr in tokenized])
    rewards = [flat[offsets[i] : offsets[i + 1]] for i in range(len(tokenized))]
    head = {
        "model": str(model),
        "reference": str(reference),
        "beta": beta,
        "data": str(data),
        "format": fmt,
        "template": template,
    }
    return report_rewards(tokenized, rewards, lines, report, output, head)


def _score_dpo_args(args) -> dict:
    if args.reference is None:
        raise UsageError("--beta applies only with --reference (DPO scoring)")
    if args.model is None:
        raise UsageError("--reference needs --model (the DPO policy, a *ForCausalLM folder)")
    return score_dpo(
        args.model,
        args.reference,
        resolve_bundled(args.data),
        args.output,
        args.template,
        args.max_length,
        args.batch_size,
        args.on_bad_row,
        args.beta,
    )


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m starling_jax.score", description=__doc__)
    parser.add_argument(
        "--model",
        default=None,
        help="HF reward-model folder / Hub id, or a checkpoint folder "
        f"(default: {cli.DEFAULT_HF_DIR}, the embedded train_rm run's export)",
    )
    parser.add_argument(
        "--data",
        default=BUNDLED_ALIAS,
        help="Nectar-format or pairwise file (jsonl, json, parquet); default: the bundled synthetic file",
    )
    parser.add_argument("--output", default=None, help="JSON-lines output, one line per input row")
    parser.add_argument(
        "--template",
        default=None,
        help="chat template: tokenizer (the model tokenizer's own), llama2_chat, openchat_3.5, "
        "chatml, raw; default: a checkpoint's recorded training template, an HF folder's "
        "own chat_template",
    )
    parser.add_argument(
        "--max-length", type=int, default=None, help="tokens per sequence (default: the run's, or 2048)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="sequences per forward pass (a micro-batch; rounded up to a multiple of the data-parallel devices)",
    )
    parser.add_argument("--on-bad-row", choices=("error", "skip"), default="error")
    parser.add_argument(
        "--reference",
        default=None,
        help="HF causal-LM folder of the reference policy: score a "
        "DPO policy (--model, a *ForCausalLM) by its implied rewards against it",
    )
    parser.add_argument(
        "--beta",
        type=float,
        default=None,
        help="with --reference: β of the implied reward "
        f"(default: the policy's recorded dpo_beta, else {DEFAULT_DPO_BETA})",
    )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    cli.setup_logging()

    def run():
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # usage errors: one line
        check_flags(args)
        if args.reference is not None or args.beta is not None:
            return _score_dpo_args(args)
        return score(
            cli.embedded_default(args.model, cli.DEFAULT_HF_DIR, "--model"),
            resolve_bundled(args.data),
            args.output,
            args.template,
            args.max_length,
            args.batch_size,
            args.on_bad_row,
        )

    return cli.run_main(run)


if __name__ == "__main__":
    cli.without_torch()
    sys.exit(main())
