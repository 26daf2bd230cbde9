"""The shared loop's pieces: named models in checkpoints (trainable + frozen), the output_dir lock, and the
non-finite skip policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starling_jax.ckpt.manager import Checkpointer, load_model, models_meta
from starling_jax.errors import CheckpointError, TrainingError
from starling_jax.model.config import ModelConfig
from starling_jax.model.create import abstract_model, create_sharded
from starling_jax.parallel import sharding
from starling_jax.train.loop import OutputLock
from starling_jax.train.optimizer import OptimConfig, make_optimizer
from starling_jax.train.state import ModelEntry, abstract_params, abstract_train_state, init_train_state

POLICY = ModelConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=None,
)
REWARD = POLICY.replace(num_hidden_layers=1, model_type="llama", param_dtype="bfloat16")


def leaves(tree):
    return [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """A checkpoint of a trainable `policy` (params + AdamW state) and a frozen bf16 `reward` model."""
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:2])
    _, policy = create_sharded(POLICY, "causal_lm", mesh, seed=1)
    _, reward = create_sharded(REWARD, "reward", mesh, seed=2)
    tx, _ = make_optimizer(OptimConfig(learning_rate=1e-3), 10)
    state, shardings = init_train_state(
        policy, sharding.state_shardings(abstract_model(POLICY, "causal_lm")[1], mesh), tx, mesh, seed=3
    )
    reward_sh = sharding.state_shardings(abstract_model(REWARD, "reward")[1], mesh)
    models = [
        ModelEntry("policy", "causal_lm", POLICY, trainable=True),
        ModelEntry("reward", "reward", REWARD, trainable=False),
    ]
    directory = tmp_path_factory.mktemp("two") / "checkpoints"
    ckpt = Checkpointer(directory, async_save=False)
    ckpt.save(5, state, {"epoch": 0, "batch": 5}, models_meta(models), frozen={"reward": reward})
    ckpt.close()
    return mesh, directory, models, state, shardings, reward, reward_sh


def test_two_named_models_restore_by_name(two_models):
    mesh, directory, models, state, shardings, reward, reward_sh = two_models
    ckpt = Checkpointer(directory, read_only=True)
    got_state, data, meta, frozen = ckpt.restore(
        abstract_train_state(state, shardings),
        5,
        abstract_frozen={"reward": abstract_params(reward, reward_sh)},
        models=models,
    )
    ckpt.close()
    assert data["batch"] == 5 and sorted(meta["models"]) == ["policy", "reward"]
    assert meta["models"]["reward"]["trainable"] is False and meta["role"] == "causal_lm"
    for a, b in zip(leaves(state), leaves(got_state)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.leaves(frozen["reward"])[0].dtype == jnp.bfloat16
    for a, b in zip(leaves(reward), leaves(frozen["reward"])):
        np.testing.assert_array_equal(a, b)
    # one model by name, as export/score/PPO read them
    meta_r, cfg_r, _, params_r = load_model(directory, mesh, name="reward")
    assert meta_r["role"] == "reward" and cfg_r.model_type == "llama"
    for a, b in zip(leaves(reward), leaves(params_r)):
        np.testing.assert_array_equal(a, b)
    _, cfg_p, _, params_p = load_model(directory, mesh)  # default: the trainable one
    for a, b in zip(leaves(state["params"]), leaves(params_p)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "change, message",
    [
        ("missing", "checkpoint has no model named 'critic'"),
        ("extra", "holds a model 'reward' this job does not have"),
        ("role", "model 'reward' has role 'reward' in the checkpoint but 'causal_lm'"),
        ("arch", "num_hidden_layers=1"),
    ],
)
def test_missing_extra_or_different_model_is_a_one_line_error(two_models, change, message):
    _, directory, models, state, shardings, _, _ = two_models
    policy, reward = models
    job_models = {
        "missing": [policy, reward, ModelEntry("critic", "reward", REWARD, trainable=True)],
        "extra": [policy],
        "role": [policy, ModelEntry("reward", "causal_lm", REWARD, trainable=False)],
        "arch": [policy, ModelEntry("reward", "reward", REWARD.replace(num_hidden_layers=2), False)],
    }[change]
    ckpt = Checkpointer(directory, read_only=True)
    with pytest.raises(CheckpointError, match=message) as err:
        ckpt.restore(abstract_train_state(state, shardings), 5, models=job_models)
    ckpt.close()
    assert "\n" not in str(err.value)


def test_output_dir_lock_refuses_a_second_run_and_dies_with_its_holder(tmp_path):
    lock = OutputLock(tmp_path)
    with pytest.raises(TrainingError, match=rf"another run \(pid {os.getpid()}\) is training in this output_dir"):
        OutputLock(tmp_path)
    lock.release()
    OutputLock(tmp_path).release()  # free again
    # a holder killed with SIGKILL leaves no stale lock
    code = (
        "import sys, time; from pathlib import Path; from starling_jax.train.loop import OutputLock; "
        f"OutputLock(Path({str(tmp_path)!r})); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(TrainingError, match=f"pid {holder.pid}"):
        OutputLock(tmp_path)
    holder.kill()
    holder.wait()
    OutputLock(tmp_path).release()


def test_second_train_rm_on_a_live_output_dir_is_refused(tmp_path, capsys):
    from starling_jax.train_rm import main

    held = OutputLock(tmp_path / "run")
    try:
        code = main([f"output_dir={tmp_path / 'run'}", "train.steps=1", "train.progress_bar=false"])
    finally:
        held.release()
    captured = capsys.readouterr()
    assert code == 2 and len(captured.err.strip().splitlines()) == 1 and "another run" in captured.err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing written beside the live run


def _poison_rows(monkeypatch, tok, word):
    """The SFT loss becomes NaN for a batch holding `word`'s first token (all batches when word is None)."""
    from starling_jax.data.sft import Conversation, tokenize_conversation
    from starling_jax.train import sft_step

    real = sft_step.sft_loss
    marker = (
        None
        if word is None
        else int(
            tokenize_conversation(
                Conversation(0, ({"role": "user", "content": "q"},), word), tok, "llama2_chat", 64
            ).tokens[-2]
        )
    )

    def poisoned(params, batch, **kwargs):
        total, aux = real(params, batch, **kwargs)
        bad = jnp.ones((), bool) if marker is None else jnp.any(batch["tokens"] == marker)
        return jnp.where(bad, jnp.nan, total), aux

    monkeypatch.setattr(sft_step, "sft_loss", poisoned)


SMALL = [
    "train.log_every=1",
    "train.eval_every=100",
    "train.save_every=2",
    "train.progress_bar=false",
    "export.hf=false",
    "export.plot=false",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "model.hidden_size=32",
    "model.intermediate_size=64",
]


def _messages_file(path, n, poison_row=None):
    rows = []
    for i in range(n):
        answer = "zebrafish" if i + 1 == poison_row else f"answer number {i}"
        rows.append(
            {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": answer}]}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_skip_nonfinite_skips_the_bad_batch_logs_its_rows_and_saves_nothing_of_it(tmp_path, monkeypatch, capsys):
    from starling_jax.data.tokenizer import default_tokenizer_dir, load_tokenizer
    from starling_jax.train_sft import main

    _poison_rows(monkeypatch, load_tokenizer(default_tokenizer_dir("llama2_chat")), "zebrafish")
    data = _messages_file(tmp_path / "m.jsonl", 32, poison_row=5)
    out = tmp_path / "run"
    args = [
        f"output_dir={out}",
        f"data.train={data}",
        "data.eval_fraction=0.0",
        f"data.eval={data}",
        "train.steps=4",
        *SMALL,
    ]
    assert main([*args, "train.skip_nonfinite=0"]) == 2  # default: the first bad batch stops the run
    err = capsys.readouterr().err
    assert "not finite" in err and "rows [" in err and "5" in err.split("rows [")[1].split("]")[0].split(", ")
    import shutil

    shutil.rmtree(out)
    assert main([*args, "train.skip_nonfinite=1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["skipped_steps"] == 1 and summary["steps"] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r.get("skipped")]
    assert len(skipped) == 1 and 5 in skipped[0]["rows"]
    # every saved checkpoint is finite, and the bad batch applied no update (3 updates in 4 batches)
    from starling_jax.ckpt.manager import Checkpointer

    ckpt = Checkpointer(out / "checkpoints", read_only=True)
    assert ckpt.manager.all_steps() == [2, 4]
    ckpt.close()
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    for step in (2, 4):
        _, _, _, params = load_model(out / "checkpoints", mesh, step=step)
        assert all(np.isfinite(x).all() for x in leaves(params))
    assert summary["eval_loss_end"] is not None and np.isfinite(summary["eval_loss_end"])


def test_skip_nonfinite_stops_after_n_in_a_row(tmp_path, monkeypatch, capsys):
    from starling_jax.train_sft import main

    _poison_rows(monkeypatch, None, None)
    data = _messages_file(tmp_path / "m.jsonl", 16)
    out = tmp_path / "run"
    code = main([f"output_dir={out}", f"data.train={data}", "train.steps=6", "train.skip_nonfinite=2", *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and "step 3:" in err and "2 batch(es) in a row were skipped" in err
    # the step-2 checkpoint moved the data position past the bad batches (a resume does not loop on them) and
    # holds no update from them: the initial parameters, finite
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [2]
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    _, _, _, params = load_model(out / "checkpoints", mesh, step=2)
    assert all(np.isfinite(x).all() for x in leaves(params))
