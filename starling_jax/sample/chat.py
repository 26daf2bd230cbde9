"""Chat generation on top of the sampler: a policy from an HF folder, Hub id or checkpoint (`load_policy`), its
stop strings and EOS ids, and `generate` (chat-templated prompts → completions as JSON lines). The `generate`
entry point, `evaluate` and `train_ppo`'s rollouts use it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from starling_jax.data.chat import TEMPLATES, adds_bos_by_tokenizer, get_template, render
from starling_jax.errors import CheckpointError, ConfigError, DataError

# End-of-turn markers of the named templates: a chat model that goes on past its turn is cut there.
TEMPLATE_STOPS = {
    "openchat_3.5": ("<|end_of_turn|>", "GPT4 Correct User:"),
    "llama2_chat": ("[INST]",),
    "chatml": ("<|im_end|>",),
    "raw": ("\n\nHuman:",),
}


def stop_token_sequences(tokenizer, stops) -> tuple[tuple[int, ...], ...]:
    """Token-level forms of each stop string: its tokens alone and as they come after a newline or a word
    (SentencePiece encodes a word differently at the start of a text), deduplicated."""
    seqs = []
    for text in stops:
        seqs.append(tuple(tokenizer.encode(text, add_special_tokens=False)))
        for prefix in ("\n", "a"):
            head = tokenizer.encode(prefix, add_special_tokens=False)
            full = tokenizer.encode(prefix + text, add_special_tokens=False)
            if full[: len(head)] == head and len(full) > len(head):
                seqs.append(tuple(full[len(head) :]))
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
    from starling_jax import hub
    from starling_jax.ckpt.manager import load_model
    from starling_jax.model import hf_io
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


def generate(
    model: str,
    conversations,
    *,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    template: str = "tokenizer",
    stops=(),
    output: str | None = None,
    num_samples: int = 1,
) -> dict:
    from tqdm import tqdm

    from starling_jax.data.tokenizer import load_tokenizer
    from starling_jax.parallel import sharding
    from starling_jax.sample.engine import SamplingConfig
    from starling_jax.sample.rollout import Sampler

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
    sampling = SamplingConfig(
        **sampling_args,
        eos_token_ids=eos_ids(folder, tokenizer, cfg),
        stop_sequences=stop_token_sequences(tokenizer, stop_strings),
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    # the sampler checks this too (Sampler.check_fits), in its own field's name; here the flag the user typed
    room = cfg.max_position_embeddings - max_new_tokens + 1
    for i, prompt in enumerate(prompts):
        if len(prompt) > room:
            raise DataError(
                f"row {i + 1}: prompt of {len(prompt)} tokens leaves no room for --max-new-tokens "
                f"{max_new_tokens} within the model's max_position_embeddings="
                f"{cfg.max_position_embeddings}"
            )
    sampler = Sampler(graphdef, params, cfg, mesh, batch_size)
    start = time.perf_counter()
    n = len(prompts)
    # sample s of row i is sampler row s·n + i: distinct row ids, so independent draws; sample 0 = one-sample run
    jobs = [(i, s) for i in range(n) for s in range(num_samples)]
    with tqdm(total=len(jobs), desc="generate", unit="row", file=sys.stderr) as bar:
        results = sampler.generate(
            [prompts[i] for i, _ in jobs],
            sampling,
            seed,
            progress=bar,
            row_ids=[s * n + i for i, s in jobs],
            names=[f"row {i + 1}" for i, _ in jobs],
        )
    seconds = time.perf_counter() - start

    lines = []
    for (i, sample), res in zip(jobs, results):
        completion = tokenizer.decode(res.tokens, skip_special_tokens=True)
        if res.finish_reason == "stop":
            cut = max((completion.rfind(s) for s in stop_strings), default=-1)
            completion = completion[:cut] if cut >= 0 else completion
        lines.append(
            {
                "row": i + 1,
                "sample": sample,
                "prompt": texts[i],
                "completion": completion,
                "finish_reason": res.finish_reason,
                "num_tokens": len(res.tokens),
            }
        )
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    else:
        for line in lines:
            print(json.dumps(line, ensure_ascii=False))
    new_tokens = sum(line["num_tokens"] for line in lines)
    return {
        "status": "completed",
        "model": str(model),
        "rows": len(lines),
        "new_tokens": new_tokens,
        "tokens_per_s": round(new_tokens / seconds, 2),
        "seconds": round(seconds, 3),
        "output": output,
        "template": template,
        "temperature": temperature,
        "seed": seed,
        "num_samples": num_samples,
    }
