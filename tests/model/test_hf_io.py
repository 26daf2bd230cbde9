"""HF ↔ starling_jax key table: byte-exact round trips, Starling v_head layouts, export config, clear errors."""

import json
import os
import shutil
import stat

import numpy as np
import pytest

from .hf_fixtures import require_torch  # noqa: E402

require_torch()

from safetensors.numpy import save_file  # noqa: E402

from starling_jax.errors import CheckpointError  # noqa: E402
from starling_jax.model.config import ModelConfig  # noqa: E402
from starling_jax.model.hf_io import key_table, load_hf, read_hf_tensors, save_hf  # noqa: E402

from .hf_fixtures import (  # noqa: E402
    cached_model,
    forward,
    hf_outputs,
    one_device_mesh,
    random_batch,
    rewrite_config,
)

MISTRAL = dict(gqa=True, sliding_window=5)


def copy_folder(src, dst, tensors=None, **config_changes):
    """A copy of a HF folder, optionally with other tensors (single model.safetensors) and config fields."""
    shutil.copytree(src, dst)
    if tensors is not None:
        for f in list(dst.glob("*.safetensors")) + list(dst.glob("*.index.json")):
            f.unlink()
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config_changes:
        rewrite_config(dst, **config_changes)
    return dst


def assert_byte_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def test_key_table_counts():
    cfg = ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    assert len(key_table(cfg, "causal_lm")) == 2 + 9 * 3 + 1
    assert len(key_table(cfg.replace(tie_word_embeddings=True), "causal_lm")) == 2 + 9 * 3
    table = key_table(cfg, "reward")
    assert len(table) == 2 + 9 * 3 + 1 and table[-1].hf == "score.weight"
    names = [s.hf for s in table]
    assert len(set(names)) == len(names)
    q = next(s for s in table if s.hf == "layers.0.self_attn.q_proj.weight")
    assert q.hf_shape == (64, 64) and q.our_shape == (64, 4, 16)
    o = next(s for s in table if s.hf == "layers.0.self_attn.o_proj.weight")
    assert o.hf_shape == (64, 64) and o.our_shape == (4, 16, 64)
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    np.testing.assert_array_equal(o.to_hf(o.to_ours(w)), w)
    np.testing.assert_array_equal(q.to_hf(q.to_ours(w)), w)
    # q_proj row h*Dh + k (torch out features) is our [:, h, k]
    np.testing.assert_array_equal(q.to_ours(w)[:, 2, 3], w[2 * 16 + 3])


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize(
    "kind,head,kwargs",
    [("mistral", "lm", MISTRAL), ("llama", "score", dict(gqa=False)), ("llama", "lm", dict(gqa=False, tied=True))],
)
def test_round_trip_is_byte_exact(kind, head, kwargs, scan, tmp_path_factory, tmp_path):
    folder = cached_model(tmp_path_factory, kind, head, **kwargs)
    role = "causal_lm" if head == "lm" else "reward"
    cfg, _, state = load_hf(folder, role, one_device_mesh(), scan_layers=scan)
    save_hf(tmp_path / "out", cfg, state, role)
    assert_byte_equal(read_hf_tensors(folder), read_hf_tensors(tmp_path / "out"))


def test_bfloat16_round_trip_and_sharded_export(tmp_path_factory, tmp_path):
    folder = cached_model(tmp_path_factory, "mistral", "lm", dtype="bfloat16", seed=3, **MISTRAL)
    original = read_hf_tensors(folder)
    assert original["model.embed_tokens.weight"].dtype.name == "bfloat16"
    cfg, _, state = load_hf(folder, "causal_lm", one_device_mesh(), param_dtype="bfloat16", scan_layers=True)
    out = save_hf(tmp_path / "out", cfg, state, "causal_lm", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert all((out / f).is_file() for f in files)
    assert_byte_equal(original, read_hf_tensors(out))
    # the sharded folder loads back (both sides) to the same parameters
    cfg2, _, state2 = load_hf(out, "causal_lm", one_device_mesh(), param_dtype="bfloat16", scan_layers=True)
    save_hf(tmp_path / "again", cfg2, state2, "causal_lm")
    assert_byte_equal(original, read_hf_tensors(tmp_path / "again"))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]


@pytest.mark.parametrize("prefix", ["transformer.", "model.", ""])
def test_starling_v_head_layout_matches_score_layout(prefix, tmp_path_factory, tmp_path):
    stock = cached_model(tmp_path_factory, "llama", "score", gqa=False)
    tensors = read_hf_tensors(stock)
    starling = {}
    for k, v in tensors.items():
        if k == "score.weight":
            starling["v_head.weight"] = v
        else:
            starling[prefix + k.removeprefix("model.")] = v
    folder = copy_folder(stock, tmp_path / "starling", starling, architectures=["LlamaForCausalLM"])
    tokens, positions, segment_ids, lengths = random_batch(seed=2)
    idx = (lengths - 1).astype(np.int32)
    mesh = one_device_mesh()
    a = forward(*load_hf(stock, "reward", mesh), tokens, positions, segment_ids, role="reward", reward_index=idx)
    b = forward(*load_hf(folder, "reward", mesh), tokens, positions, segment_ids, role="reward", reward_index=idx)
    np.testing.assert_array_equal(a, b)


def test_reward_from_lm_checkpoint_and_export_loads_in_transformers(tmp_path_factory, tmp_path):
    lm = cached_model(tmp_path_factory, "mistral", "lm", **MISTRAL)
    with pytest.raises(CheckpointError, match="init_missing_head"):
        load_hf(lm, "reward", one_device_mesh())
    cfg, _, state = load_hf(lm, "reward", one_device_mesh(), init_missing_head=True, seed=7)
    head = np.asarray(state["score"]["kernel"].get_value())
    assert head.shape == (64, 1) and 0.005 < head.std() < 0.05
    _, _, lm_state = load_hf(lm, "causal_lm", one_device_mesh())
    np.testing.assert_array_equal(
        np.asarray(state["decoder"]["embed"].get_value()), np.asarray(lm_state["decoder"]["embed"].get_value())
    )
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    (tok_dir / "chat_template.jinja").write_text("{{ messages }}")
    out = save_hf(
        tmp_path / "rm",
        cfg,
        state,
        "reward",
        tokenizer_dir=tok_dir,
        extra_config={"reward_mean": 0.5, "reward_std": 2.0},
    )
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MistralForSequenceClassification"]
    assert config["num_labels"] == 1 and config["id2label"] == {"0": "LABEL_0"} and config["pad_token_id"] == 0
    assert config["reward_mean"] == 0.5 and config["sliding_window"] == 5
    assert (out / "tokenizer_config.json").is_file() and (out / "chat_template.jinja").is_file()
    tokens, positions, segment_ids, lengths = random_batch(seed=4)
    ref = hf_outputs(out, tokens, lengths, "score")
    ours = forward(
        cfg,
        *load_hf(out, "reward", one_device_mesh())[1:],
        tokens,
        positions,
        segment_ids,
        role="reward",
        reward_index=(lengths - 1).astype(np.int32),
    )
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # a reward export needs a pad token
    with pytest.raises(CheckpointError, match="pad_token_id"):
        save_hf(tmp_path / "nopad", cfg.replace(pad_token_id=None), state, "reward")


# ------------------------------------------------------------------------------------------------ errors
def test_role_mismatch_errors(tmp_path_factory):
    cls = cached_model(tmp_path_factory, "llama", "score", gqa=False)
    with pytest.raises(CheckpointError, match="no LM head.*role 'reward'"):
        load_hf(cls, "causal_lm", one_device_mesh())


def test_missing_folder_config_weights(tmp_path_factory, tmp_path):
    src = cached_model(tmp_path_factory, "mistral", "lm", **MISTRAL)
    mesh = one_device_mesh()
    with pytest.raises(CheckpointError, match="no such model folder"):
        load_hf(tmp_path / "nope", "causal_lm", mesh)
    no_cfg = copy_folder(src, tmp_path / "nocfg")
    (no_cfg / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"nocfg/config\.json"):
        load_hf(no_cfg, "causal_lm", mesh)
    no_w = copy_folder(src, tmp_path / "now")
    (no_w / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"now: no model\.safetensors"):
        load_hf(no_w, "causal_lm", mesh)


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="no-such-org/no-such-model.*Hub"):
        load_hf("no-such-org/no-such-model", "causal_lm", one_device_mesh())


def test_unknown_architecture(tmp_path_factory, tmp_path):
    src = cached_model(tmp_path_factory, "mistral", "lm", **MISTRAL)
    folder = copy_folder(src, tmp_path / "gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(CheckpointError, match=r"config\.json: unknown architecture model_type='gpt2'"):
        load_hf(folder, "causal_lm", one_device_mesh())


def test_missing_extra_and_misshapen_tensors(tmp_path_factory, tmp_path):
    src = cached_model(tmp_path_factory, "mistral", "lm", **MISTRAL)
    tensors = read_hf_tensors(src)
    mesh = one_device_mesh()

    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    folder = copy_folder(src, tmp_path / "missing", missing)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj"
        r"\.weight' \(expected shape \[128, 64\]\)",
    ):
        load_hf(folder, "causal_lm", mesh)

    extra = dict(tensors, **{"model.layers.2.mlp.up_proj.weight": tensors["model.layers.1.mlp.up_proj.weight"]})
    folder = copy_folder(src, tmp_path / "extra", extra)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.2\.mlp"):
        load_hf(folder, "causal_lm", mesh)

    bad = dict(tensors, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)})
    folder = copy_folder(src, tmp_path / "shape", bad)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight'"
        r" has shape \[64, 64\], expected \[32, 64\]",
    ):
        load_hf(folder, "causal_lm", mesh)

    # config and weights disagree (wrong intermediate_size in config.json)
    folder = copy_folder(src, tmp_path / "cfg", intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight' has shape \[128, 64\], expected \[96, 64\]"):
        load_hf(folder, "causal_lm", mesh)


def test_pickle_weights_are_refused(tmp_path_factory, tmp_path):
    src = cached_model(tmp_path_factory, "mistral", "lm", **MISTRAL)
    for name in ("pytorch_model.bin", "model.pt"):
        folder = copy_folder(src, tmp_path / name.replace(".", "_"))
        (folder / "model.safetensors").unlink()
        (folder / name).write_bytes(b"\x80\x04not really a pickle")
        with pytest.raises(CheckpointError, match=rf"{name}: refusing to unpickle.*convert the weights to safetensors"):
            load_hf(folder, "causal_lm", one_device_mesh())


def test_sharded_index_with_missing_shard(tmp_path_factory, tmp_path):
    src = cached_model(tmp_path_factory, "mistral", "lm", **MISTRAL)
    cfg, _, state = load_hf(src, "causal_lm", one_device_mesh())
    out = save_hf(tmp_path / "sharded", cfg, state, "causal_lm", max_shard_bytes=100_000)
    victim = sorted(out.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json: shard file {victim.name} is missing"):
        load_hf(out, "causal_lm", one_device_mesh())


def test_missing_torch_fails_the_parity_suite(monkeypatch):
    """A missing torch is an ImportError at collection (a CI failure), not a skip."""
    import sys

    from .hf_fixtures import require_torch

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="dev extra"):
        require_torch()


def test_export_is_atomic_and_refuses_a_non_empty_folder(tmp_path_factory, tmp_path, monkeypatch):
    """save_hf writes a temporary sibling and renames it: a failure mid-write leaves the old folder as it was and
    no temporary folder behind; overwrite=False refuses an existing non-empty folder."""
    import safetensors.numpy

    src = cached_model(tmp_path_factory, "mistral", "lm", **MISTRAL)
    cfg, _, state = load_hf(src, "causal_lm", one_device_mesh())
    out = save_hf(tmp_path / "out", cfg, state, "causal_lm")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # the modes a plain mkdir / open give under the umask (mkdtemp's 0700 would hide the export from other users)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert modes == {p: (0o777 if p == "out" else 0o666) & ~umask for p in modes}, oct(umask)
    with pytest.raises(CheckpointError, match="not empty.*--overwrite"):
        save_hf(out, cfg, state, "causal_lm", overwrite=False)
    calls = []

    def fail_on_second_shard(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(tensors, path, metadata=metadata)

    real = safetensors.numpy.save_file
    monkeypatch.setattr(safetensors.numpy, "save_file", fail_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        save_hf(out, cfg, state, "causal_lm", max_shard_bytes=40_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    assert all(".tmp-" in str(p) for p in calls)  # every shard went to the temporary folder first
    monkeypatch.setattr(safetensors.numpy, "save_file", real)
    save_hf(out, cfg, state, "causal_lm", max_shard_bytes=40_000, overwrite=True)
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
