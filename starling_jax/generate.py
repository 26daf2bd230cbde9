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
import time
from pathlib import Path

from starling_jax import cli
from starling_jax.data.chat import TEMPLATE_NAMES, TEMPLATES, adds_bos_by_tokenizer, get_template, parse_hh, render
from starling_jax.data.prompts import read_prompts
from starling_jax.data.synthetic import bundled_path
from starling_jax.errors import CheckpointError, ConfigError, DataError, UsageError

DEFAULT_SFT_RUN_DIR = "runs/sft_default"  # where `python -m starling_jax.train_sft` writes by default
DEFAULT_SFT_HF_DIR = f"{DEFAULT_SFT_RUN_DIR}/hf"
NUM_DEFAULT_PROMPTS = 4
# End-of-turn markers of the named templates: a chat model that goes on past its turn is cut there.
TEMPLATE_STOPS = {
    "openchat_3.5": ("<|end_of_turn|>", "GPT4 Correct User:"),
    "llama2_chat": ("[INST]",),
    "chatml": ("<|im_end|>",),
    "raw": ("\n\nHuman:",),
}


# ---------------------------------------------------------------------------------------------- inputs
def default_conversations() -> list[list[dict[str, str]]]:
    """A few prompts from the end of the bundled synthetic Nectar file (the data the default runs train on)."""
    lines = bundled_path().read_text(encoding="utf-8").splitlines()
    return [parse_hh(json.loads(line)["prompt"]) for line in lines[-NUM_DEFAULT_PROMPTS:]]


def stop_token_sequences(tokenizer, stops) -> tuple[tuple[int, ...], ...]:
    """Token-level forms of each stop string: its tokens alone and as they come after a newline or a word
    (SentencePiece encodes a word differently at the start of a text), deduplicated."""
    seqs = []
    for text in stops:
        seqs.append(tuple(tokenizer.encode(text, add_special_tokens=False)))
        for prefix in ("\n", "a"):
            head = tokenizer.encode(prefix, add_special_tokens=False)
            full = tokenizer.encode(prefix + text, add_special_tokens=False)
            if full[:len(head)] == head and len(full) > len(head):
                seqs.append(tuple(full[len(head):]))
    return tuple(dict.fromkeys(s for s in seqs if s))


def eos_ids(folder: Path | None, tokenizer, model_cfg) -> tuple[int, ...]:
    ids = [tokenizer.eos_token_id, model_cfg.eos_token_id]
    if folder is not None and (folder / "generation_config.json").is_file():
        try:
            value = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{folder / 'generation_config.json'}: not valid JSON ({e})") from None
        ids += value if isinstance(value, list) else [value]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def template_name(template: str, tokenizer) -> str | None:
    """The named template in use (for its stop strings): the given one, or the one the tokenizer's equals."""
    if template != "tokenizer":
        return template
    own = getattr(tokenizer, "chat_template", None)
    return next((name for name, source in TEMPLATES.items() if source == own), None)


# ---------------------------------------------------------------------------------------------- model
def load_policy(model: str, mesh):
    """→ (model cfg, graphdef, params, tokenizer folder, HF folder or None) from an HF folder or a checkpoint."""
    from starling_jax.ckpt.manager import load_model
    from starling_jax.model import hf_io, hub
    from starling_jax.paths import as_path

    path = as_path(model)  # a local folder or a URL (gs://...)
    if not path.is_dir() or (path / "config.json").is_file():  # an HF folder, URL or Hub id (or a one-line error)
        folder = hub.resolve(model, key="--model")
        cfg, graphdef, params = hf_io.load_hf(folder, "causal_lm", mesh)
        return cfg, graphdef, params, folder, folder
    meta, cfg, graphdef, params = load_model(path, mesh)
    if meta["role"] != "causal_lm":
        raise CheckpointError(f"{model}: a {meta['role']} checkpoint, not a causal-LM policy")
    if not meta.get("tokenizer_dir"):
        raise CheckpointError(f"{model}: checkpoint metadata names no tokenizer_dir")
    return cfg, graphdef, params, Path(meta["tokenizer_dir"]), None


def ensure_default_policy() -> str:
    """The default train_sft run's HF export, training it first (in a subprocess) when it is missing."""
    if Path(DEFAULT_SFT_HF_DIR, "config.json").is_file():
        return DEFAULT_SFT_HF_DIR
    if importlib.util.find_spec("starling_jax.train_sft") is None:
        raise ConfigError(f"--model not given and {DEFAULT_SFT_HF_DIR} does not exist, and this checkout has no "
                          f"starling_jax.train_sft to train it; pass --model")
    cli.run_default_run("starling_jax.train_sft", f"{DEFAULT_SFT_RUN_DIR}.log",
                        f"to train the default policy {DEFAULT_SFT_HF_DIR} (--model not given)", "pass --model")
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


def generate(model: str, conversations, *, max_new_tokens: int = 256, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 16, template: str = "tokenizer",
             stops=(), output: str | None = None, num_samples: int = 1) -> dict:
    from tqdm import tqdm

    from starling_jax.parallel import sharding
    from starling_jax.sample.engine import SamplingConfig
    from starling_jax.sample.rollout import Sampler
    from starling_jax.tokenizer import load_tokenizer

    get_template(template)  # an unknown name fails before the model is loaded
    if num_samples < 1:
        raise ConfigError(f"--num-samples {num_samples}: must be ≥ 1")
    sampling_args = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    SamplingConfig(**sampling_args)  # bad values fail before the model is loaded, too
    mesh = sharding.make_mesh(sharding.MeshConfig())
    cfg, graphdef, params, tokenizer_dir, folder = load_policy(model, mesh)
    tokenizer = load_tokenizer(tokenizer_dir)
    texts = [render(tokenizer, conv, template) for conv in conversations]
    add_bos = adds_bos_by_tokenizer(template)
    prompts = [tokenizer.encode(t, add_special_tokens=add_bos) for t in texts]
    stop_strings = tuple(dict.fromkeys((*TEMPLATE_STOPS.get(template_name(template, tokenizer), ()), *stops)))
    sampling = SamplingConfig(**sampling_args, eos_token_ids=eos_ids(folder, tokenizer, cfg),
                              stop_sequences=stop_token_sequences(tokenizer, stop_strings),
                              pad_token_id=tokenizer.pad_token_id or 0)
    # the sampler checks this too (Sampler.check_fits), in its own field's name; here the flag the user typed
    room = cfg.max_position_embeddings - max_new_tokens + 1
    for i, prompt in enumerate(prompts):
        if len(prompt) > room:
            raise DataError(f"row {i + 1}: prompt of {len(prompt)} tokens leaves no room for --max-new-tokens "
                            f"{max_new_tokens} within the model's max_position_embeddings="
                            f"{cfg.max_position_embeddings}")
    sampler = Sampler(graphdef, params, cfg, mesh, batch_size)
    start = time.perf_counter()
    n = len(prompts)
    # sample s of row i is sampler row s·n + i: distinct row ids, so independent draws; sample 0 = one-sample run
    jobs = [(i, s) for i in range(n) for s in range(num_samples)]
    with tqdm(total=len(jobs), desc="generate", unit="row", file=sys.stderr) as bar:
        results = sampler.generate([prompts[i] for i, _ in jobs], sampling, seed, progress=bar,
                                   row_ids=[s * n + i for i, s in jobs],
                                   names=[f"row {i + 1}" for i, _ in jobs])
    seconds = time.perf_counter() - start

    lines = []
    for (i, sample), res in zip(jobs, results):
        completion = tokenizer.decode(res.tokens, skip_special_tokens=True)
        if res.finish_reason == "stop":
            cut = max((completion.rfind(s) for s in stop_strings), default=-1)
            completion = completion[:cut] if cut >= 0 else completion
        lines.append({"row": i + 1, "sample": sample, "prompt": texts[i], "completion": completion,
                      "finish_reason": res.finish_reason, "num_tokens": len(res.tokens)})
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    else:
        for line in lines:
            print(json.dumps(line, ensure_ascii=False))
    new_tokens = sum(line["num_tokens"] for line in lines)
    return {"status": "completed", "model": str(model), "rows": len(lines), "new_tokens": new_tokens,
            "tokens_per_s": round(new_tokens / seconds, 2), "seconds": round(seconds, 3), "output": output,
            "template": template, "temperature": temperature, "seed": seed, "num_samples": num_samples}


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m starling_jax.generate", description=__doc__)
    parser.add_argument("--model", default=None, help="HF causal-LM folder or policy checkpoint "
                        f"(default: {DEFAULT_SFT_HF_DIR}, the default train_sft run's export, trained if missing)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", action="append", default=None, help="a user message (repeatable)")
    source.add_argument("--data", default=None, help="Nectar-format file (HH prompt) or JSON lines with messages")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--template", default="tokenizer", help=f"chat template: {', '.join(TEMPLATE_NAMES)} "
                        "(tokenizer = the model folder's own, default)")
    parser.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable)")
    parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt (independent draws)")
    parser.add_argument("--output", default=None, help="JSON-lines output file (default: print the lines)")
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
        return generate(model, conversations, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                        template=args.template, stops=args.stop, output=args.output,
                        num_samples=args.num_samples)

    return cli.run_main(run)


if __name__ == "__main__":
    cli.without_torch()
    sys.exit(main())
