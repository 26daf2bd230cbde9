"""The reward-model step: non-finite guard, frozen layers, micro-batches, schedule, bf16 compute, NaN in the loop."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from starling_jax.model.config import ModelConfig
from starling_jax.model.create import abstract_model, create_sharded
from starling_jax.parallel import sharding
from starling_jax.train import rm_step
from starling_jax.train.optimizer import OptimConfig, learning_rate_schedule, make_optimizer, trainable_mask
from starling_jax.train.state import init_train_state

CFG = ModelConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=None,
)


def make_batch(seed=0, b=4, k=3, length=12):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, length + 1, (b, k))
    tokens = rng.integers(1, CFG.vocab_size, (b, k, length)).astype(np.int32)
    seg = (np.arange(length)[None, None] < lengths[..., None]).astype(np.int32)
    ranks = np.stack([rng.permutation(k) + 1 for _ in range(b)]).astype(np.float32)
    return {
        "tokens": tokens * seg,
        "positions": (np.arange(length)[None, None] * seg).astype(np.int32),
        "segment_ids": seg,
        "reward_index": (lengths - 1).astype(np.int32),
        "ranks": ranks,
        "answer_mask": np.ones((b, k), bool),
    }


def setup(cfg=CFG, freeze=0, lr=1e-2, micro=1, devices=None, eps=1e-8):
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=devices or jax.devices()[:1])
    graphdef, params = create_sharded(cfg, "reward", mesh, seed=0)
    _, abstract = abstract_model(cfg, "reward")
    mask = trainable_mask(params, freeze, cfg.num_hidden_layers) if freeze else None
    tx, schedule = make_optimizer(
        OptimConfig(learning_rate=lr, weight_decay=0.1, freeze_layers=freeze, eps=eps), 10, mask
    )
    state, shardings = init_train_state(params, sharding.state_shardings(abstract, mesh), tx, mesh, seed=0)
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in make_batch().items()}
    step = rm_step.jit_train_step(graphdef, tx, schedule, rm_step.LossConfig(), micro, mesh, shardings, batch_sh)
    return state, step


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_non_finite_loss_leaves_the_state_untouched():
    state, step = setup(eps=1e-3)  # the full-batch step of test_micro_batches_equal_the_full_batch: one compile
    before = leaves(state)
    state, metrics = step(state, make_batch())
    assert bool(metrics["finite"]) and int(state["step"]) == 1
    good = leaves(state)
    assert any(not np.array_equal(a, b) for a, b in zip(before, good))

    # poison the parameters' score head: every reward, the loss and the gradient become NaN
    poisoned = jax.tree.map(lambda x: x, state)
    kernel = poisoned["params"]["score"]["kernel"]
    kernel.set_value(jnp.full_like(kernel.get_value(), jnp.nan))
    snapshot = leaves(poisoned)
    after, metrics = step(poisoned, make_batch(1))
    assert not bool(metrics["finite"])
    assert int(after["step"]) == 1  # no update counted
    for a, b in zip(snapshot, leaves(after)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scan", [False, True])
def test_frozen_layers_do_not_move(scan):
    cfg = CFG.replace(scan_layers=scan)
    state, step = setup(cfg, freeze=2)
    before = jax.tree.map(np.asarray, state["params"])
    for i in range(3):
        state, _ = step(state, make_batch(i))
    after = state["params"]
    np.testing.assert_array_equal(before["decoder"]["embed"].get_value(), after["decoder"]["embed"].get_value())
    if scan:
        qb = np.asarray(before["decoder"]["layers"]["attn"]["q_proj"].get_value())
        qa = np.asarray(after["decoder"]["layers"]["attn"]["q_proj"].get_value())
        np.testing.assert_array_equal(qb[:2], qa[:2])
        assert not np.array_equal(qb[2], qa[2])
    else:
        for i in range(3):
            qb = np.asarray(before["decoder"]["layers"][i]["attn"]["q_proj"].get_value())
            qa = np.asarray(after["decoder"]["layers"][i]["attn"]["q_proj"].get_value())
            assert np.array_equal(qb, qa) == (i < 2)
    assert not np.array_equal(before["score"]["kernel"].get_value(), after["score"]["kernel"].get_value())


def test_micro_batches_equal_the_full_batch():
    # Adam's first update is ~lr·sign(g): with eps=1e-8, float rounding in a ~0 gradient can flip it; a larger
    # eps keeps the parameter comparison meaningful (the gradients themselves are compared through their norm)
    full_state, full_step = setup(eps=1e-3)
    micro_state, micro_step = setup(micro=2, eps=1e-3)
    for i in range(2):
        full_state, m_full = full_step(full_state, make_batch(i))
        micro_state, m_micro = micro_step(micro_state, make_batch(i))
        np.testing.assert_allclose(float(m_full["loss"]), float(m_micro["loss"]), atol=1e-6)
        np.testing.assert_allclose(float(m_full["grad_norm"]), float(m_micro["grad_norm"]), rtol=1e-5)
    for a, b in zip(leaves(full_state["params"]), leaves(micro_state["params"])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_warmup_then_cosine_decay():
    schedule = learning_rate_schedule(
        OptimConfig(learning_rate=1.0, warmup_steps=10, end_learning_rate_ratio=0.1), total_steps=110
    )
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.55, abs=1e-3)  # halfway down the cosine to 0.1
    assert float(schedule(110)) == pytest.approx(0.1)


def test_bf16_compute_stays_close_to_fp32():
    batch = make_batch()
    rewards = {}
    for dtype in ("float32", "bfloat16"):
        cfg = CFG.replace(dtype=dtype)
        model = nnx.merge(
            *create_sharded(cfg, "reward", sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1]), seed=0)
        )
        rewards[dtype] = np.asarray(rm_step.eval_rewards(nnx.state(model), batch, graphdef=nnx.graphdef(model)))
    scale = np.abs(rewards["float32"]).max()
    assert np.abs(rewards["float32"] - rewards["bfloat16"]).max() <= 0.03 * max(scale, 1.0)


def test_nan_loss_in_a_run_stops_before_any_checkpoint(tmp_path, monkeypatch, capsys):
    from starling_jax.data.synthetic import generate, write_jsonl
    from starling_jax.train_rm import main

    data = write_jsonl(generate(40, seed=1), tmp_path / "d.jsonl")
    real_loss = rm_step.rm_loss

    def nan_loss(*args, **kwargs):
        total, aux = real_loss(*args, **kwargs)
        return total * jnp.nan, aux

    monkeypatch.setattr(rm_step, "rm_loss", nan_loss)
    out = tmp_path / "run"
    code = main(
        [
            f"output_dir={out}",
            f"data.train={data}",
            "train.steps=5",
            "train.save_every=1",
            "train.log_every=1",
            "train.progress_bar=false",
            "export.plot=false",
            "data.eval_fraction=0.2",
        ]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert "step 1" in captured.err and "not finite" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["error_type"] == "TrainingError"
    steps = [p for p in (out / "checkpoints").iterdir() if p.name.isdigit()] if (out / "checkpoints").exists() else []
    assert steps == []


def test_fused_attention_trains_like_einsum_on_padded_batches():
    """attention_impl=fused (jax.nn.dot_product_attention from row lengths) gives the einsum path's losses,
    gradient norms and parameters over two steps on right-padded K-wise batches, with a binding window."""
    cfg = CFG.replace(sliding_window=5)
    einsum_state, einsum_step = setup(cfg, eps=1e-3)
    fused_state, fused_step = setup(cfg.replace(attention_impl="fused"), eps=1e-3)
    for i in range(2):
        einsum_state, m_einsum = einsum_step(einsum_state, make_batch(i))
        fused_state, m_fused = fused_step(fused_state, make_batch(i))
        assert bool(m_fused["finite"])
        np.testing.assert_allclose(float(m_einsum["loss"]), float(m_fused["loss"]), atol=1e-5)
        np.testing.assert_allclose(float(m_einsum["grad_norm"]), float(m_fused["grad_norm"]), rtol=1e-4)
    for a, b in zip(leaves(einsum_state["params"]), leaves(fused_state["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_attention_impl_errors_are_config_errors():
    from starling_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="attention_impl='flash'"):
        CFG.replace(attention_impl="flash")
    if jax.default_backend() != "gpu":
        model = nnx.merge(
            *create_sharded(
                CFG.replace(attention_impl="cudnn"),
                "reward",
                sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1]),
            )
        )
        with pytest.raises(ConfigError, match="attention_impl=cudnn needs a GPU"):
            rm_step.eval_rewards(nnx.state(model), make_batch(), graphdef=nnx.graphdef(model))


def test_micro_batches_with_uneven_valid_prompts_on_eight_devices():
    """Micro-batches holding different numbers of valid prompts (whole prompts masked out, unevenly between the
    interleaved micro-batches, one of them none) give the full batch's parameters after several steps on an
    8-device mesh: the step sums losses and counts over micro-batches instead of averaging per micro-batch."""
    devices = jax.devices()[:8]

    def uneven(i):
        batch = make_batch(i, b=16)
        # micro-batch m of 4 takes rows m, m+4, m+8, m+12: masking most odd rows leaves micro-batches 0 and 2
        # 4 valid prompts each, micro-batch 1 none and micro-batch 3 one (row 15); M=2 (8 valid against 1) would
        # prove the same sum over fewer micro-batches, for one more compile
        valid = np.ones(16, bool)
        valid[[1, 3, 5, 7, 9, 11, 13]] = False
        batch["answer_mask"] &= valid[:, None]
        return batch

    full_state, full_step = setup(eps=1e-3, devices=devices)
    micro4_state, micro4_step = setup(micro=4, eps=1e-3, devices=devices)
    for i in range(3):
        full_state, m_full = full_step(full_state, uneven(i))
        micro4_state, m_micro4 = micro4_step(micro4_state, uneven(i))
        assert float(m_full["num_prompts"]) == float(m_micro4["num_prompts"]) == 9
        np.testing.assert_allclose(float(m_micro4["loss"]), float(m_full["loss"]), atol=1e-6)
    for a, c in zip(leaves(full_state["params"]), leaves(micro4_state["params"])):
        np.testing.assert_allclose(c, a, atol=1e-6)
    assert int(full_state["step"]) == 3
