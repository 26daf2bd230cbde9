"""The supervised fine-tuning job: chat conversations → a `*ForCausalLM` policy. Run by `train/loop.py`.

Its parts: one trainable model `policy` (role `causal_lm`), the SFT batch (`data.batch_spec.SFT_TRAIN`), the step
`sft_step.train_step` (token-mean NLL of the assistant's tokens), eval loss and perplexity on the held-out split
(also at step 0: `eval_loss_start`), and an HF export whose tokenizer carries the training chat template and whose
`generation_config.json` stops at the template's end-of-turn token.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import jax

from starling_jax.data import pipeline as data_pipeline
from starling_jax.data.batch_spec import SFT_TRAIN, round_up
from starling_jax.data.chat import get_template
from starling_jax.data.sft import Conversation, SFTPipeline, load_examples, tokenize_conversation
from starling_jax.data.synthetic import resolve_bundled
from starling_jax.data.tokenizer import load_tokenizer
from starling_jax.errors import CheckpointError
from starling_jax.model import hf_io
from starling_jax.parallel import sharding
from starling_jax.train import loop, sft_step
from starling_jax.train.job import (
    JobSetup,
    OneModelJob,
    Program,
    Steps,
    batch_tokens,
    init_model,
    new_figure,
    plot_loss,
    resolve_tokenizer_dir,
    save_figure,
)
from starling_jax.train.sft_config import SFTRunConfig

log = logging.getLogger("starling_jax")
ROLE = "causal_lm"
MODEL_NAME = "policy"
_PROBE = Conversation(
    0,
    (
        {"role": "user", "content": "Hello there. Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And another one?"},
    ),
    "Green, like  grass 🙂",
)


def eval_micro_batches(eval_batch_size: int, train_rows_per_micro: int) -> int:
    """Eval micro-batches holding at most as many rows as a train micro-batch (a divisor of the eval batch)."""
    micro = max(1, -(-eval_batch_size // max(train_rows_per_micro, 1)))
    while eval_batch_size % micro:
        micro += 1
    return micro


def export_chat_template(tokenizer, template: str) -> str:
    """The Jinja template whose `apply_chat_template(messages, tokenize=True)` gives the training tokens.

    HF tokenizes a chat rendering with `add_special_tokens=False`, while training lets the tokenizer add the BOS
    of the named templates; so the BOS is written into the exported template when the plain one misses it."""
    source = get_template(template) or tokenizer.chat_template
    want = tokenize_conversation(_PROBE, tokenizer, template, 1 << 20).tokens.tolist()
    conv = [*_PROBE.messages, {"role": "assistant", "content": _PROBE.answer}]
    for cand in (source, "{{ bos_token }}" + source, "{{ bos_token }} " + source):
        got = tokenizer.apply_chat_template(conv, chat_template=cand, tokenize=True)
        got = got["input_ids"] if hasattr(got, "keys") else got
        if [int(i) for i in got] == want:
            return cand
    raise CheckpointError(
        f"template {template}: no chat_template reproduces the training tokens through "
        "apply_chat_template with this tokenizer"
    )


def end_of_turn_ids(tokenizer, template: str) -> list[int]:
    """The token a rendered assistant turn ends with (generation stops there), then the tokenizer's EOS."""
    end = int(tokenize_conversation(_PROBE, tokenizer, template, 1 << 20).tokens[-1])
    eos = tokenizer.eos_token_id
    return [end] + ([int(eos)] if eos is not None and int(eos) != end else [])


def export_causal_lm(
    folder: Path, model_cfg, params, tokenizer, tokenizer_dir, template: str, extra_config: dict | None = None
) -> Path:
    """An HF `*ForCausalLM` folder whose tokenizer carries the training chat template (`export_chat_template`) and
    whose `generation_config.json` stops at the template's end-of-turn token (train_sft's and train_dpo's export)."""
    from transformers import GenerationConfig

    chat_template = export_chat_template(tokenizer, template)
    eos_ids = end_of_turn_ids(tokenizer, template)
    hf_io.save_hf(folder, model_cfg, params, ROLE, tokenizer_dir=tokenizer_dir, extra_config=extra_config)
    if jax.process_index() == 0:
        config_path = folder / "tokenizer_config.json"
        tok_cfg = json.loads(config_path.read_text())
        tok_cfg["chat_template"] = chat_template
        config_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
        stale = folder / "chat_template.jinja"  # transformers prefers it over tokenizer_config's template
        if stale.exists():
            stale.write_text(chat_template)
        generation = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id
        )
        # what save_pretrained writes, through the folder's own path type (folder may be a URL)
        (folder / "generation_config.json").write_text(generation.to_json_string(use_diff=True))
    return folder


class SFTJob(OneModelJob):
    model_name, role = MODEL_NAME, ROLE
    name = "train_sft"
    window_means = ("loss",)
    hidden_metrics = ("num_tokens",)

    def __init__(self, cfg: SFTRunConfig):
        super().__init__(cfg)
        self.eval_start: dict = {}
        self.skipped_rows: list[dict] = []

    # --- set-up
    def setup(self, mesh) -> JobSetup:
        cfg, d = self.cfg, self.cfg.data
        self.tokenizer_dir = resolve_tokenizer_dir(d.tokenizer, cfg.init_from, d.template)
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        common = dict(tokenizer=self.tokenizer, template=d.template, max_length=d.max_length, on_bad_row=d.on_bad_row)
        train, train_report = load_examples(
            resolve_bundled(d.train), "train", eval_fraction=0.0 if d.eval else d.eval_fraction, **common
        )
        if d.eval:
            evals, eval_report = load_examples(resolve_bundled(d.eval), "train", eval_fraction=0.0, **common)
        else:
            evals, eval_report = load_examples(
                resolve_bundled(d.train), "eval", eval_fraction=d.eval_fraction, **common
            )
        self.skipped_rows = sorted(
            {s["row"]: s for s in train_report.skipped + eval_report.skipped}.values(), key=lambda s: s["row"]
        )
        pipe = dict(
            max_length=d.max_length,
            pad_to_multiple=d.pad_to_multiple,
            pad_id=self.tokenizer.pad_token_id or 0,
            seed=cfg.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        train_fraction = 0.0 if d.eval else d.eval_fraction
        self.train_data = SFTPipeline(
            train,
            global_batch_size=d.batch_size,
            mode="train",
            report=train_report,
            name=d.train,
            eval_fraction=train_fraction,
            **pipe,
        )
        self.eval_data = SFTPipeline(
            evals,
            global_batch_size=d.eval_batch_size,
            mode="eval",
            report=eval_report,
            name=d.eval or d.train,
            eval_fraction=0.0 if d.eval else d.eval_fraction,
            **pipe,
        )
        log.info(
            "data: %d train / %d eval conversations (%d answer tokens in train)",
            len(train),
            len(evals),
            sum(len(e) - e.answer_start for e in train),
        )
        # the batch axis of every device array is split over the data-parallel devices
        sharding.require_batch_multiple(
            mesh, {"data.batch_size": d.batch_size, "data.eval_batch_size": d.eval_batch_size}
        )
        model_cfg, graphdef, params, params_shardings = init_model(
            cfg.model_config, cfg.init_from, ROLE, mesh, cfg.seed, self.tokenizer.pad_token_id
        )
        if model_cfg.vocab_size < len(self.tokenizer):
            raise CheckpointError(f"model vocab_size={model_cfg.vocab_size} < tokenizer size {len(self.tokenizer)}")
        data = (self.train_data, self.eval_data)
        return self.one_model_setup(mesh, model_cfg, graphdef, params, params_shardings, *data)

    def _eval_micro(self) -> int:
        d = self.cfg.data
        return eval_micro_batches(d.eval_batch_size, d.batch_size // self.cfg.train.micro_batches)

    def start(self, state, frozen, meta: dict | None, steps: Steps) -> None:
        """The eval loss before any update (kept in the checkpoint metadata, so a resumed run reports it too)."""
        if meta is not None and meta.get("eval_start"):
            self.eval_start = meta["eval_start"]
        else:
            self.eval_start = steps.evaluate(state, frozen, self.cfg.train.eval_max_batches)
            log.info("step 0 eval: %s", self.eval_start)

    # --- the programs: train step, eval
    def steps(self, mesh, setup: JobSetup, state) -> Steps:
        cfg, opt = self.cfg, setup.optimizer
        graphdef = setup.graphdefs[MODEL_NAME]
        train_fn = sft_step.jit_train_step(
            graphdef,
            opt.tx,
            opt.schedule,
            cfg.train.micro_batches,
            mesh,
            jax.tree.map(lambda x: x.sharding, state),
            SFT_TRAIN.shardings(mesh),
            grad_mask=opt.mask,
            max_grad_norm=cfg.optim.max_grad_norm,
        )
        eval_fn = sft_step.jit_eval_step(graphdef, mesh, self._eval_micro())
        rows = sharding.batch_sharding(mesh, 1).spec

        def to_global(host_batch: dict) -> dict:
            return data_pipeline.to_global(SFT_TRAIN.select(host_batch), mesh, rows)

        def train(state, frozen, host_batch):
            new_state, metrics = train_fn(state, to_global(host_batch))
            return new_state, metrics, batch_tokens(host_batch)

        def evaluate(state, frozen, max_batches: int = 0) -> dict:
            nll = tokens = 0.0
            for i, batch in enumerate(iter(setup.eval_data)):
                if max_batches and i >= max_batches:
                    break
                out = jax.device_get(eval_fn(state["params"], to_global(batch)))
                nll += float(out["nll"])
                tokens += float(out["tokens"])
            loss = nll / max(tokens, 1.0)
            return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(tokens)}

        d = cfg.data
        length = round_up(d.max_length, d.pad_to_multiple)
        programs = [
            Program(
                "update",
                train_fn,
                (state, SFT_TRAIN.abstract({"B": d.batch_size, "L": length}, mesh)),
                donated=state,
                roles=("state",),
            ),
            Program(
                "eval", eval_fn, (state["params"], SFT_TRAIN.abstract({"B": d.eval_batch_size, "L": length}, mesh))
            ),
        ]
        return Steps(train, evaluate, programs)

    # --- metadata, export, summary, plot
    def meta(self, last_eval: dict) -> dict:
        return {
            "tokenizer_dir": str(self.tokenizer_dir),
            "template": self.cfg.data.template,
            "max_length": self.cfg.data.max_length,
            "eval_start": self.eval_start,
        }

    def export(self, state, frozen, last_eval, folder: Path) -> Path:
        return export_causal_lm(
            folder, self.model_cfg, state["params"], self.tokenizer, self.tokenizer_dir, self.cfg.data.template
        )

    def summary(self, last_eval: dict) -> dict:
        return {
            "train_examples": self.train_data.num_examples,
            "eval_examples": self.eval_data.num_examples,
            "rows_skipped": len(self.skipped_rows),
            "eval_loss_start": self.eval_start.get("loss"),
            "eval_loss_end": last_eval.get("loss"),
            "eval_perplexity_start": self.eval_start.get("perplexity"),
            "eval_perplexity_end": last_eval.get("perplexity"),
        }

    def plot(self, history: list[dict], last_eval: dict, png: Path) -> None:
        fig, (ax1,) = new_figure(1)
        plot_loss(
            ax1,
            history,
            f"SFT loss (eval {self.eval_start.get('loss', float('nan')):.3f} → "
            f"{last_eval.get('loss', float('nan')):.3f})",
        )
        save_figure(fig, png)


def train_sft(cfg: SFTRunConfig) -> dict[str, Any]:
    return loop.run(SFTJob(cfg))
