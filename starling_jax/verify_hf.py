"""Parity check of a HuggingFace Mistral/Llama folder: starling_jax (JAX) vs transformers (PyTorch).

    python -m starling_jax.verify_hf --model HF_DIR [--dtype float32|bfloat16] [--tolerance X]

Loads the folder with `hf_io.load_hf` (mesh over all devices, fsdp) and with transformers (`AutoModelForCausalLM`
or `AutoModelForSequenceClassification` per `architectures`, float32, eager attention), runs both on fixed texts
(the folder's tokenizer, right padding) or, without a tokenizer, fixed random token ids, and prints ONE JSON line.

Causal LM: `max_abs_logit_diff`, `mean_kl` (KL(HF ‖ ours) per real token), `top1_agreement` over real tokens.
Sequence classification: `max_abs_score_diff` at the last real token (the reward) and
`max_abs_token_score_diff` over every real token (HF per-token scores from its trunk + `score`), and
`max_abs_pooled_score_diff`: our reward at the last real token against transformers' own model output
(`*ForSequenceClassification` pools at the last token that is not `pad_token_id`) on the right-padded batch, so
a pad id that can end a rendering (pad = eos) fails here. Random-id inputs end with the EOS id, as renderings do.

Pass/fail: `scaled_diff = max_abs_diff / max(1, max |reference|)` must be ≤ the tolerance, i.e. an absolute
bound for logits/scores of magnitude ≤ 1 and a relative one for larger ones. Defaults: 1e-4 in float32 and
5e-2 in bfloat16 (our compute in bfloat16 with float32 parameters, against the float32 PyTorch reference).
The reference always runs in float32. Exit codes: 0 pass (`status` "completed", `passed` true), 1 above tolerance
(`status` "failed", `passed` false), 2 user error (one line on stderr, `status` "error"). The last stdout line is
always the JSON summary.
torch is needed (`pip install starling_jax[dev]`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from starling_jax import cli
from starling_jax.errors import CheckpointError, ConfigError

DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "[INST] What is the capital of France? [/INST] The capital of France is Paris.</s>",
    "GPT4 Correct User: Write a haiku about JAX.<|end_of_turn|>GPT4 Correct Assistant: Arrays flow through XLA",
    "Reward models read the score at the last real token.",
]


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m starling_jax.verify_hf", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        default=None,
        help=f"HF model folder (or Hub id); default: {cli.DEFAULT_HF_DIR}, the embedded train_rm run's export",
    )
    p.add_argument("--dtype", default="float32", choices=sorted(DEFAULT_TOLERANCE), help="starling_jax compute dtype")
    p.add_argument("--tolerance", type=float, default=None, help="max scaled |diff| (defaults: %s)" % DEFAULT_TOLERANCE)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p


def _inputs(folder: Path, vocab: int, pad_id: int, max_length: int, seed: int, eos_id: int | None = None):
    """tokens [N, L] right-padded with pad_id, lengths [N], and where they came from."""
    import numpy as np  # numpy, JAX and torch load in the functions, not at import: `--help` stays instant

    has_tokenizer = any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    rows = None
    source = "random_ids"
    if has_tokenizer:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder))
            rows = [tok(t, add_special_tokens=True)["input_ids"][:max_length] for t in TEXTS]
            if any(max(r) >= vocab for r in rows if r):
                rows = None
            else:
                source = "tokenizer"
        except Exception:  # a folder with a broken/unsupported tokenizer still gets checked on random ids
            rows = None
    if rows is None:
        rng = np.random.default_rng(seed)
        candidates = np.array([i for i in range(min(vocab, 1 << 20)) if i != pad_id])
        lengths = [min(max_length, n) for n in (17, 11, 5, 23)]
        rows = [rng.choice(candidates, size=n).tolist() for n in lengths]
        if eos_id is not None and 0 <= eos_id < vocab:
            rows = [r[:-1] + [int(eos_id)] for r in rows]  # end like a rendering, where the reward is read
    lengths = np.array([len(r) for r in rows], np.int32)
    length = int(lengths.max())
    tokens = np.full((len(rows), length), pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return tokens, lengths, source


def verify(
    model: str, dtype: str = "float32", tolerance: float | None = None, max_length: int = 64, seed: int = 0
) -> dict:
    try:
        import torch
        import transformers
    except ImportError:
        raise ConfigError("verify_hf needs PyTorch: pip install 'starling_jax[dev]' (torch CPU build)") from None
    import jax
    import numpy as np
    from flax import nnx

    from starling_jax import hub
    from starling_jax.model import hf_io
    from starling_jax.parallel.sharding import MeshConfig, activation_sharding, make_mesh

    folder = hub.resolve(model, key="--model")
    hf_cfg = hf_io.read_hf_config(folder)
    archs = hf_cfg.get("architectures") or []
    seq_cls = any(a.endswith("ForSequenceClassification") for a in archs)
    role = "reward" if seq_cls else "causal_lm"
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance

    mesh = make_mesh(MeshConfig())
    cfg, graphdef, state = hf_io.load_hf(folder, role, mesh, dtype=dtype, param_dtype="float32")
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    eos = hf_cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    tokens, lengths, source = _inputs(
        folder, cfg.vocab_size, pad_id, max_length, seed, eos if isinstance(eos, int) else None
    )
    ar = np.arange(tokens.shape[1])[None, :]
    real = ar < lengths[:, None]
    positions = np.where(real, ar, 0).astype(np.int32)
    segment_ids = real.astype(np.int32)

    @jax.jit
    def ours_fn(state, tokens, positions, segment_ids):
        return nnx.merge(graphdef, state)(tokens, positions, segment_ids)

    # float32 means float32 matmuls: on GPU the default precision is TF32 and on TPU bf16 passes, which alone
    # move logits by ~1e-3 (measured on an H200: 9.0e-4 default vs 6.0e-7 highest; BENCHMARKS.md).
    precision = "highest" if dtype == "float32" else "default"
    with activation_sharding(mesh), jax.default_matmul_precision(precision):
        ours = np.asarray(ours_fn(state, tokens, positions, segment_ids), np.float64)

    cls = transformers.AutoModelForSequenceClassification if seq_cls else transformers.AutoModelForCausalLM
    try:
        ref_model = cls.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()
    except Exception as e:
        raise CheckpointError(f"{folder}: transformers cannot load it ({type(e).__name__}: {e})") from None
    ids = torch.from_numpy(tokens.astype(np.int64))
    mask = torch.from_numpy(real.astype(np.int64))
    with torch.no_grad():
        if seq_cls:
            trunk = getattr(ref_model, ref_model.base_model_prefix)
            hidden = trunk(input_ids=ids, attention_mask=mask).last_hidden_state
            ref = ref_model.score(hidden)[..., 0].double().numpy()  # per-token scores [N, L]
            # transformers' own pooling (last token that is not pad_token_id) on the right-padded batch
            pooled = ref_model(input_ids=ids, attention_mask=mask).logits[:, 0].double().numpy()
        else:
            ref = ref_model(input_ids=ids, attention_mask=mask).logits.double().numpy()

    summary = {
        "model": str(model),
        "role": role,
        "architectures": archs,
        "dtype": dtype,
        "inputs": source,
        "num_sequences": int(len(lengths)),
        "num_tokens": int(real.sum()),
    }
    if seq_cls:
        last = lengths - 1
        rows = np.arange(len(lengths))
        diff_last = np.abs(ours[rows, last] - ref[rows, last])
        summary["max_abs_score_diff"] = float(diff_last.max())
        summary["max_abs_token_score_diff"] = float(np.abs(ours - ref)[real].max())
        summary["max_abs_pooled_score_diff"] = float(np.abs(ours[rows, last] - pooled).max())
        summary["max_abs_reference_score"] = float(np.abs(ref[real]).max())
        max_diff, scale = summary["max_abs_score_diff"], summary["max_abs_reference_score"]
        max_diff = max(max_diff, summary["max_abs_token_score_diff"], summary["max_abs_pooled_score_diff"])
    else:
        diff = np.abs(ours - ref)[real]
        summary["max_abs_logit_diff"] = float(diff.max())
        log_p = ref - _logsumexp(ref)
        log_q = ours - _logsumexp(ours)
        kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
        summary["mean_kl"] = float(kl[real].mean())
        summary["top1_agreement"] = float((ref.argmax(-1) == ours.argmax(-1))[real].mean())
        summary["max_abs_reference_logit"] = float(np.abs(ref[real]).max())
        max_diff, scale = summary["max_abs_logit_diff"], summary["max_abs_reference_logit"]
    summary["scaled_diff"] = float(max_diff / max(1.0, scale))
    summary["tolerance"] = tolerance
    summary["passed"] = bool(summary["scaled_diff"] <= tolerance)
    summary["status"] = "completed" if summary["passed"] else "failed"
    return summary


def _logsumexp(x):
    import numpy as np  # not at import (as above)

    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def main(argv=None) -> int:
    def run():
        args = build_parser().parse_args(argv)  # usage errors: one line (cli.ArgumentParser)
        model = cli.embedded_default(args.model, cli.DEFAULT_HF_DIR, "--model")
        return verify(model, args.dtype, args.tolerance, args.max_length, args.seed)

    # status "completed" (exit 0) when within tolerance, "failed" (exit 1) above it; `passed` says the same
    return cli.run_main(run, on_error=lambda: {"passed": False})


if __name__ == "__main__":
    sys.exit(main())
