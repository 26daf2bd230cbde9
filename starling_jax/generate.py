"""Generate completions with a causal LM (answer files for MT-Bench / AlpacaEval-style judging).

    python -m starling_jax.generate --model DIR (--prompt TEXT | --data FILE) [--max-new-tokens N]
        [--temperature T] [--top-k K] [--top-p P] [--seed S] [--batch-size B] [--template NAME]
        [--stop TEXT ...] [--num-samples K] [--output FILE]

DIR is an HF causal-LM folder (`*ForCausalLM` + tokenizer) or a starling_jax policy checkpoint (Orbax run folder).
`--data` takes Nectar-format rows (an HH `prompt`) or JSON lines with `messages` (a role/content list). Each
conversation is rendered with the chat template (`--template`, default the model folder's own) with the
generation prompt added; completions are decoded without special tokens, and a stop string that ended a row is
cut from its text. Rows end at an EOS id (the tokenizer's, config.json's and generation_config.json's), at a stop
string (`--stop`, plus the template's end-of-turn markers, matched at the token level) or after
`--max-new-tokens`. `--temperature 0` is greedy.

Output: JSON lines in input order (to `--output`, or printed), each with `row`, `sample`, `prompt` (the rendered
text the model saw), `completion`, `finish_reason` (eos | stop | length) and `num_tokens`. `--num-samples K`
writes K completions per prompt (lines `sample` 0..K-1 of a row follow each other): independent draws, sample s of
row i drawn with the sampler's row id s·N + i (N prompts; each row id folds into the key), so sample 0 is what a
run without `--num-samples` gives. `python -m starling_jax.gather_answers` turns such files into unranked
Nectar rows for `label`. The last printed line is a JSON
summary with `rows`, `new_tokens` and `tokens_per_s` (generation time including compilation).

With no arguments it generates with the policy of the default `python -m starling_jax.train_sft` run
(`runs/sft_default/hf`, trained first if missing) for a few bundled prompts and prints the completions.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from starling_jax import cli
from starling_jax.data.bundled import bundled_path
from starling_jax.data.chat import TEMPLATE_NAMES, parse_hh
from starling_jax.data.prompts import read_prompts
from starling_jax.errors import ConfigError, UsageError
from starling_jax.sample.chat import generate, load_policy  # noqa: F401 (tests reach them as generate.X)

DEFAULT_SFT_RUN_DIR = "runs/sft_default"  # where `python -m starling_jax.train_sft` writes by default
DEFAULT_SFT_HF_DIR = f"{DEFAULT_SFT_RUN_DIR}/hf"
NUM_DEFAULT_PROMPTS = 4


# ---------------------------------------------------------------------------------------------- inputs
def default_conversations() -> list[list[dict[str, str]]]:
    """A few prompts from the end of the bundled synthetic Nectar file (the data the default runs train on)."""
    lines = bundled_path().read_text(encoding="utf-8").splitlines()
    return [parse_hh(json.loads(line)["prompt"]) for line in lines[-NUM_DEFAULT_PROMPTS:]]


def ensure_default_policy() -> str:
    """The default train_sft run's HF export, training it first (in a subprocess) when it is missing."""
    if Path(DEFAULT_SFT_HF_DIR, "config.json").is_file():
        return DEFAULT_SFT_HF_DIR
    if importlib.util.find_spec("starling_jax.train_sft") is None:
        raise ConfigError(
            f"--model not given and {DEFAULT_SFT_HF_DIR} does not exist, and this checkout has no "
            f"starling_jax.train_sft to train it; pass --model"
        )
    cli.run_default_run(
        "starling_jax.train_sft",
        f"{DEFAULT_SFT_RUN_DIR}.log",
        f"to train the default policy {DEFAULT_SFT_HF_DIR} (--model not given)",
        "pass --model",
    )
    if not Path(DEFAULT_SFT_HF_DIR, "config.json").is_file():
        raise ConfigError(f"python -m starling_jax.train_sft did not write {DEFAULT_SFT_HF_DIR}; pass --model")
    return DEFAULT_SFT_HF_DIR


# ---------------------------------------------------------------------------------------------- main
def check_flags(args) -> None:
    """The flags' values, checked before anything is trained, loaded or read; a bad one is a `UsageError` naming
    the flag as typed (`--top-p 2`), not the sampler's field."""
    checks = [
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "must be at least 1"),
        ("--temperature", args.temperature, args.temperature >= 0, "must be ≥ 0 (0 = greedy)"),
        ("--top-k", args.top_k, args.top_k >= 0, "must be ≥ 0 (0 = off)"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "must be in (0, 1] (1 = off)"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, "must be at least 1 (rows per batch)"),
    ]
    for flag, value, ok, rule in checks:
        if not ok:
            shown = int(value) if isinstance(value, float) and value.is_integer() else value  # as typed: 2, not 2.0
            raise UsageError(f"{flag} {shown}: {rule}")
    if args.template not in TEMPLATE_NAMES:
        raise UsageError(f"--template {args.template}: choose one of {', '.join(TEMPLATE_NAMES)}")
    for stop in args.stop:
        if not stop:
            raise UsageError("--stop '': an empty stop string would end every row at once")


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m starling_jax.generate", description=__doc__)
    parser.add_argument(
        "--model",
        default=None,
        help="HF causal-LM folder or policy checkpoint "
        f"(default: {DEFAULT_SFT_HF_DIR}, the default train_sft run's export, trained if missing)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", action="append", default=None, help="a user message (repeatable)")
    source.add_argument("--data", default=None, help="Nectar-format file (HH prompt) or JSON lines with messages")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--template",
        default="tokenizer",
        help=f"chat template: {', '.join(TEMPLATE_NAMES)} (tokenizer = the model folder's own, default)",
    )
    parser.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable)")
    parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt (independent draws)")
    parser.add_argument("--output", default=None, help="JSON-lines output file (default: print the lines)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    cli.setup_logging()

    def run():
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # usage errors: one line
        check_flags(args)  # before the default policy is trained or any model is loaded
        if args.prompt:
            conversations = [[{"role": "user", "content": p}] for p in args.prompt]
        elif args.data:
            conversations = read_prompts(args.data)
        else:
            conversations = default_conversations()
        model = args.model if args.model is not None else ensure_default_policy()
        return generate(
            model,
            conversations,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            batch_size=args.batch_size,
            template=args.template,
            stops=args.stop,
            output=args.output,
            num_samples=args.num_samples,
        )

    return cli.run_main(run)


if __name__ == "__main__":
    cli.without_torch()
    sys.exit(main())
