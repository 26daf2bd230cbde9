"""Loading HF weights onto 8 simulated devices (data=2, fsdp=2, tensor=2): shard shapes follow the rules table and
the sharded forward equals the one-device forward."""

import jax
import numpy as np
import pytest

pytest.importorskip("torch")

from starling_jax.model.hf_io import load_hf, read_hf_tensors  # noqa: E402
from starling_jax.parallel.sharding import MeshConfig, assert_sharded, make_mesh  # noqa: E402

from .hf_fixtures import cached_model, forward, one_device_mesh, random_batch  # noqa: E402

MISTRAL = dict(gqa=True, sliding_window=5)  # D=64, H=4, G=2, Dh=16, F=128, V=256, 2 layers


@pytest.fixture(scope="module")
def mesh8():
    assert jax.device_count() == 8
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


def leaf(state, *path):
    for p in path:
        state = state[p]
    return state.get_value()


# Expected local shard shapes, by hand from LOGICAL_RULES: embed→fsdp(2), q_heads/kv_heads/mlp/vocab→tensor(2),
# head_dim/norm/layers/score→replicated; `data` never shards parameters.
EXPECTED = {
    ("decoder", "embed"): ((256, 64), (128, 32)),  # (vocab, embed)
    ("attn", "q_proj"): ((64, 4, 16), (32, 2, 16)),  # (embed, q_heads, head_dim)
    ("attn", "k_proj"): ((64, 2, 16), (32, 1, 16)),  # (embed, kv_heads, head_dim)
    ("attn", "o_proj"): ((4, 16, 64), (2, 16, 32)),  # (q_heads, head_dim, embed)
    ("mlp", "gate_proj"): ((64, 128), (32, 64)),  # (embed, mlp)
    ("mlp", "down_proj"): ((128, 64), (64, 32)),  # (mlp, embed)
    ("attn_norm", "scale"): ((64,), (64,)),  # (norm,)
    ("lm_head", "kernel"): ((64, 256), (32, 128)),  # (embed, vocab)
}


@pytest.mark.parametrize("scan", [False, True])
def test_load_hf_shards_follow_rules_and_forward_matches(scan, mesh8, tmp_path_factory):
    folder = cached_model(tmp_path_factory, "mistral", "lm", **MISTRAL)
    cfg, graphdef, state = load_hf(folder, "causal_lm", mesh8, scan_layers=scan)
    assert_sharded(state, mesh8)
    layer = ("decoder", "layers") if scan else ("decoder", "layers", 1)
    for key, (full, shard) in EXPECTED.items():
        if key[0] in ("attn", "mlp", "attn_norm"):
            arr = leaf(state, *layer, *key)
            if scan:
                full, shard = (2,) + full, (2,) + shard
        else:
            arr = leaf(state, *key)
        assert arr.shape == full, key
        assert arr.sharding.shard_shape(arr.shape) == shard, key
        for s in arr.addressable_shards:  # each device holds exactly its slice of the full tensor
            assert s.data.shape == shard
    # values placed per shard equal the HF tensor (spot check one layer-1 projection through every shard)
    hf = read_hf_tensors(folder)["model.layers.1.self_attn.q_proj.weight"]
    q = leaf(state, *layer, "attn", "q_proj")
    for s in q.addressable_shards:
        full = hf.T.reshape(64, 4, 16)
        idx = s.index[1:] if scan else s.index
        got = np.asarray(s.data)[1] if scan else np.asarray(s.data)
        np.testing.assert_array_equal(got, full[idx])

    tokens, positions, segment_ids, lengths = random_batch(n=4, lengths=[12, 9, 6, 3], length=12)
    sharded = forward(cfg, graphdef, state, tokens, positions, segment_ids, mesh=mesh8)
    cfg1, graphdef1, state1 = load_hf(folder, "causal_lm", one_device_mesh(), scan_layers=scan)
    single = forward(cfg1, graphdef1, state1, tokens, positions, segment_ids)
    real = segment_ids.astype(bool)
    np.testing.assert_array_less(np.abs(sharded - single)[real].max(), 1e-5)


def test_reward_model_sharded_matches_one_device(mesh8, tmp_path_factory):
    folder = cached_model(tmp_path_factory, "llama", "score", gqa=False)
    cfg, graphdef, state = load_hf(folder, "reward", mesh8, scan_layers=True, remat_policy="full")
    assert_sharded(state, mesh8)
    score = leaf(state, "score", "kernel")
    assert score.sharding.shard_shape(score.shape) == (32, 1)  # (embed→fsdp, score→replicated)
    tokens, positions, segment_ids, lengths = random_batch(n=4, lengths=[12, 9, 6, 3], length=12, seed=5)
    idx = (lengths - 1).astype(np.int32)
    sharded = forward(cfg, graphdef, state, tokens, positions, segment_ids, role="reward", mesh=mesh8, reward_index=idx)
    single = forward(
        *load_hf(folder, "reward", one_device_mesh()), tokens, positions, segment_ids, role="reward", reward_index=idx
    )
    np.testing.assert_allclose(sharded, single, atol=1e-5, rtol=0)


def test_batch_sizes_that_do_not_split_over_the_data_parallel_devices_are_a_config_error():
    from starling_jax.errors import ConfigError
    from starling_jax.parallel.sharding import packed_row_multiple, require_batch_multiple

    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))  # 4 data-parallel devices
    require_batch_multiple(mesh, {"data.batch_size": 8, "data.eval_batch_size": 4})
    with pytest.raises(ConfigError) as e:
        require_batch_multiple(mesh, {"data.batch_size": 8, "data.eval_batch_size": 6})
    assert str(e.value) == (
        "data.eval_batch_size=6 is not a multiple of the mesh's 4 data-parallel devices (mesh.data=1 × mesh.fsdp=4)"
    )
    assert packed_row_multiple(mesh) == 4  # one process holds all 4: its rows come in fours
