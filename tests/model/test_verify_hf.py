"""`python -m starling_jax.verify_hf`: passes on a faithful folder, fails (non-zero) on a corrupted one."""

import json

import pytest

from .hf_fixtures import require_torch  # noqa: E402

require_torch()

from starling_jax import verify_hf  # noqa: E402

from .hf_fixtures import cached_model, rewrite_config  # noqa: E402
from .test_hf_io import copy_folder  # noqa: E402

MISTRAL = dict(gqa=True, sliding_window=5)


def run(capsys, *argv):
    code = verify_hf.main(list(argv))
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


def test_causal_lm_folder_passes(tmp_path_factory, capsys):
    folder = cached_model(tmp_path_factory, "mistral", "lm", **MISTRAL)
    code, summary = run(capsys, "--model", str(folder))
    assert code == 0, summary
    assert summary["passed"] and summary["status"] == "completed"  # the summary rule (cli.STATUSES)
    assert summary["role"] == "causal_lm" and summary["inputs"] == "random_ids"
    assert summary["max_abs_logit_diff"] <= 1e-4 and summary["top1_agreement"] == 1.0
    assert summary["mean_kl"] < 1e-8 and summary["tolerance"] == 1e-4


def test_sequence_classification_folder_passes_in_bfloat16(tmp_path_factory, capsys):
    folder = cached_model(tmp_path_factory, "llama", "score", gqa=False)
    code, summary = run(capsys, "--model", str(folder), "--dtype", "bfloat16")
    assert code == 0, summary
    assert summary["role"] == "reward" and summary["tolerance"] == 5e-2
    assert {"max_abs_score_diff", "max_abs_token_score_diff", "scaled_diff"} <= set(summary)


def test_unsupported_rope_scaling_is_a_user_error(tmp_path_factory, tmp_path, capsys):
    """A config feature the decoder does not implement is refused (exit 2), never silently mis-computed."""
    src = cached_model(tmp_path_factory, "mistral", "lm", **MISTRAL)
    folder = copy_folder(src, tmp_path / "scaled")
    rewrite_config(folder, rope_scaling={"rope_type": "linear", "factor": 2.0})
    code = verify_hf.main(["--model", str(folder)])
    captured = capsys.readouterr()
    assert code == 2 and "RoPE scaling" in captured.err


@pytest.mark.parametrize("corruption", ["tensor", "rope_theta"])
def test_corrupted_starling_side_fails(corruption, tmp_path_factory, monkeypatch, capsys):
    """Our side differs from the folder (one tensor scaled by 1.01 after loading, or a wrong rope_theta in the config
    our model runs with) → exit 1 with passed=false. (A wrong rope_theta in config.json itself would be read by
    both sides alike, so the corruption is injected into our side only.)"""
    from starling_jax.model import hf_io
    from starling_jax.model.create import abstract_model

    folder = cached_model(tmp_path_factory, "mistral", "lm", **MISTRAL)
    real_load = hf_io.load_hf

    def load_and_perturb(*args, **kwargs):
        cfg, graphdef, state = real_load(*args, **kwargs)
        if corruption == "tensor":
            var = state["decoder"]["layers"][0]["mlp"]["down_proj"]
            var.set_value(var.get_value() * 1.01)
        else:
            cfg = cfg.replace(rope_theta=500000.0)
            graphdef, _ = abstract_model(cfg, "causal_lm")
        return cfg, graphdef, state

    monkeypatch.setattr(hf_io, "load_hf", load_and_perturb)
    code, summary = run(capsys, "--model", str(folder))
    assert code == 1 and summary["passed"] is False and summary["status"] == "failed"
    assert summary["max_abs_logit_diff"] > 1e-4


@pytest.mark.parametrize("corruption", ["score_head", "trunk"])
def test_corrupted_sequence_classification_fails_in_bfloat16(corruption, tmp_path_factory, monkeypatch, capsys):
    """bf16 has a loose tolerance (5e-2 scaled); a real corruption of the reward head or of one trunk matrix on our
    side must still fail it."""
    from starling_jax.model import hf_io

    folder = cached_model(tmp_path_factory, "llama", "score", gqa=False)
    real_load = hf_io.load_hf

    def load_and_perturb(*args, **kwargs):
        cfg, graphdef, state = real_load(*args, **kwargs)
        var = (
            state["score"]["kernel"]
            if corruption == "score_head"
            else state["decoder"]["layers"][0]["mlp"]["down_proj"]
        )
        var.set_value(var.get_value() * 1.25)
        return cfg, graphdef, state

    monkeypatch.setattr(hf_io, "load_hf", load_and_perturb)
    code, summary = run(capsys, "--model", str(folder), "--dtype", "bfloat16")
    assert code == 1 and summary["passed"] is False and summary["scaled_diff"] > 5e-2, summary


def test_hf_pooling_with_pad_equal_to_eos_fails(tmp_path_factory, tmp_path, capsys):
    """transformers' own pooled output is compared on a right-padded batch: with pad_token_id = eos, the token
    renderings end with, HF reads every reward one token early, and verify_hf says so."""
    src = cached_model(tmp_path_factory, "llama", "score", gqa=False)
    code, summary = run(capsys, "--model", str(src))
    assert code == 0 and summary["max_abs_pooled_score_diff"] <= 1e-4, summary
    folder = copy_folder(src, tmp_path / "pad_eos", pad_token_id=2)
    code, summary = run(capsys, "--model", str(folder))
    assert code == 1 and summary["passed"] is False and summary["max_abs_pooled_score_diff"] > 1e-3, summary


def test_missing_folder_is_a_user_error(tmp_path, capsys):
    code = verify_hf.main(["--model", str(tmp_path / "missing")])
    captured = capsys.readouterr()
    assert code == 2
    assert len(captured.err.strip().splitlines()) == 1 and "no such model folder" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["passed"] is False
