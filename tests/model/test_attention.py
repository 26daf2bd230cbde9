"""Attention implementations (model/attention/) against the einsum reference and a brute-force rule.

The layout rule is re-derived here token by token from a *semantic* description of each row (which group,
prompt or which answer, index, position), not from the segment-id encoding, so an encoding bug cannot hide.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from starling_jax.errors import ConfigError
from starling_jax.model import attention as A
from starling_jax.model.attention import blockwise as B
from starling_jax.model.config import ModelConfig
from starling_jax.model.heads import build_model

S = A.PREFIX_STRIDE
N, L, H, G, DH = 4, 40, 4, 2, 8


def _layout():
    """Rows as lists of (kind, group, answer, length): plain segments, shared-prefix groups, padding after."""
    rows = [
        [("plain", 1, 0, 30)],  # one right-padded sequence
        [("plain", 1, 0, 10), ("plain", 2, 0, 15), ("plain", 3, 0, 12)],  # packed
        [
            ("prompt", 1, 0, 8),
            ("answer", 1, 1, 6),
            ("answer", 1, 2, 6),  # two shared-prefix groups
            ("prompt", 2, 0, 5),
            ("answer", 2, 1, 5),
            ("answer", 2, 2, 3),
            ("answer", 2, 3, 2),
        ],
        [("plain", 1, 0, 7), ("prompt", 1, 0, 9), ("answer", 1, 1, 11)],  # a plain segment then a group
    ]
    seg = np.zeros((N, L), np.int32)
    pos = np.zeros((N, L), np.int32)
    meta = [[None] * L for _ in range(N)]
    for r, parts in enumerate(rows):
        i = 0
        prompt_end = 0
        for kind, group, answer, n in parts:
            if kind == "plain":
                seg[r, i : i + n] = group + (10 if r == 3 else 0)
                pos[r, i : i + n] = np.arange(n)
            elif kind == "prompt":
                seg[r, i : i + n] = group * S
                pos[r, i : i + n] = np.arange(n)
                prompt_end = n
            else:
                seg[r, i : i + n] = group * S + answer
                pos[r, i : i + n] = prompt_end + np.arange(n)
            for t in range(n):
                meta[r][i + t] = (kind, group, answer)
            i += n
    return seg, pos, meta


def _brute_mask(meta, pos, window):
    out = np.zeros((N, L, L), bool)
    for r in range(N):
        for i in range(L):
            for j in range(i + 1):
                a, b = meta[r][i], meta[r][j]
                if a is None or b is None:
                    continue
                if a[0] == "plain" or b[0] == "plain":
                    ok = a == b  # a plain segment sees only itself
                else:
                    ok = a[1] == b[1] and (b[0] == "prompt" or a == b)  # own group's prompt, or itself
                out[r, i, j] = ok and (window is None or pos[r, i] - pos[r, j] < window)
    return out


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return f(N, L, H, DH), f(N, L, G, DH), f(N, L, G, DH), f(N, L, H, DH)


@pytest.mark.parametrize("window", [None, 5])
def test_mask_encodes_the_rule(window):
    seg, pos, meta = _layout()
    got = np.asarray(A.attention_mask(jnp.asarray(seg), jnp.asarray(pos), window))[:, 0, 0]
    np.testing.assert_array_equal(got, _brute_mask(meta, pos, window))
    # no token ever sees another segment's tokens: sibling answers and other groups stay apart
    assert not got[2, 14:20, 8:14].any() and not got[2, 20:, :20].any() and not got[1, 10:25, :10].any()


def assert_equals_einsum(attend, qkv, seg, pos, window, jit: bool = True) -> np.ndarray:
    """attend(q, k, v) against the einsum reference over (seg, pos, window): outputs on real tokens, and a loss
    that reads only those and its gradients (fp32, 1e-5; padding outputs are unread by contract). → attend's
    outputs."""
    q, k, v, w = qkv
    real = (seg != 0)[..., None, None]
    w = w * real

    def value_and_grad(fn):
        def loss(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(out * w), out

        f = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)
        return jax.jit(f) if jit else f

    (le, oe), ge = value_and_grad(lambda q, k, v: A.einsum_attention(q, k, v, A.attention_mask(seg, pos, window)))(
        q, k, v
    )
    (lx, ox), gx = value_and_grad(attend)(q, k, v)
    np.testing.assert_allclose(np.asarray(ox * real), np.asarray(oe * real), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(lx), float(le), rtol=1e-5)
    for a, b in zip(gx, ge):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    return np.asarray(ox)


@pytest.mark.parametrize(
    "window,blocks,per_row",
    [
        (None, (16, 8), True),
        (5, (8, 16), True),
        (None, (64, 64), True),
        (3, (8, 8), True),
        (None, (8, 8), False),
        # the strip form (block_k None): L = 40 pads to 48 with 16
        (None, (16, None), True),
        (5, (8, None), True),
        (3, (64, None), True),
        (None, (8, None), False),
    ],
)
def test_blockwise_equals_einsum_values_and_gradients(qkv, window, blocks, per_row):
    seg, pos, _ = _layout()
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    out = assert_equals_einsum(
        lambda q, k, v: A.blockwise_attention(q, k, v, seg, pos, window, *blocks, per_row=per_row),
        qkv,
        seg,
        pos,
        window,
    )
    assert np.all(out[~np.asarray(seg != 0)] == 0)  # padding rows see nothing


def test_live_blocks_cover_every_visible_pair_and_skip_dead_ones():
    """`_live_blocks` may only drop block pairs in which no token sees another (checked against the brute-force
    rule, row by row and over the batch); it does drop sibling answers, other segments and padding."""
    seg, pos, meta = _layout()
    brute = _brute_mask(meta, pos, None)  # [N, L, L]
    b = 8
    blocks = brute.reshape(N, L // b, b, L // b, b).any(axis=(2, 4))  # [N, nq, nk]
    causal = np.tril(np.ones((L // b, L // b), bool))
    for r in range(N):
        live = np.asarray(B._live_blocks(jnp.asarray(seg[r : r + 1]), b, b))
        assert not (blocks[r] & ~live).any(), r
        if r in (1, 2):  # packed segments, shared-prefix groups: some causal pairs are dead
            assert (causal & ~live).any(), r
    union = np.asarray(B._live_blocks(jnp.asarray(seg), b, b))
    assert not (blocks.any(0) & ~union).any()
    assert not np.asarray(B._live_blocks(jnp.zeros((1, 16), jnp.int32), 8, 8)).any()  # padding sees nothing


def test_blockwise_never_holds_the_score_matrix():
    """Compiled forward+backward at L=4096: the temporaries stay far below one [N, H, L, L] f32 score tensor."""
    n, length, h, g, dh = 1, 4096, 2, 1, 16
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    ints = jax.ShapeDtypeStruct((n, length), jnp.int32)

    def f(q, k, v, seg, pos):
        return jnp.sum(A.blockwise_attention(q, k, v, seg, pos, None, 256, 256))

    compiled = (
        jax.jit(jax.grad(f, (0, 1, 2)))
        .lower(spec(n, length, h, dh), spec(n, length, g, dh), spec(n, length, g, dh), ints, ints)
        .compile()
    )
    scores_bytes = n * h * length * length * 4
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < scores_bytes / 16, (temp, scores_bytes)


def test_blockwise_strip_form_holds_one_row_of_scores_at_a_time():
    """The strip form (block_k None, rows of <= 512 tokens on CPU) keeps about one row's [H, L, L] scores in
    flight (its unrolled strips of that row) plus the batch's boolean strip masks, never the batch's scores:
    8 rows of 512 tokens compile to temporaries under half of the batch's [N, H, L, L] f32 scores (measured
    0.43; holding every row's strips would be ~1.8 x)."""
    n, length, h, g, dh = 8, 512, 2, 1, 16
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    ints = jax.ShapeDtypeStruct((n, length), jnp.int32)

    def f(q, k, v, seg, pos):
        return jnp.sum(A.blockwise_attention(q, k, v, seg, pos, None, 64, None))

    compiled = (
        jax.jit(jax.grad(f, (0, 1, 2)))
        .lower(spec(n, length, h, dh), spec(n, length, g, dh), spec(n, length, g, dh), ints, ints)
        .compile()
    )
    scores_bytes = n * h * length * length * 4
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < scores_bytes / 2, (temp, scores_bytes)


TINY = ModelConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=6,
    pad_token_id=0,
)


def test_decoder_blockwise_equals_einsum():
    seg, pos, _ = _layout()
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 97, size=(N, L)) * (seg != 0), jnp.int32)
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    real = seg != 0

    def run(impl):
        model = build_model(TINY.replace(attention_impl=impl, attention_block=16), "reward", seed=3)
        graphdef, params = nnx.split(model)

        def f(p):
            scores = nnx.merge(graphdef, p)(tokens, pos, seg)
            return jnp.sum(jnp.where(real, scores, 0.0) ** 2), scores

        (_, scores), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
        return np.asarray(scores)[np.asarray(real)], grads

    se, ge = run("einsum")
    sb, gb = run("blockwise")
    np.testing.assert_allclose(sb, se, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gb), jax.tree.leaves(ge)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_layouts_an_implementation_cannot_handle_are_one_line_errors():
    for impl, layout, window in (
        ("fused", "packed", None),
        ("cudnn", "shared_prefix", None),
        ("splash", "shared_prefix", 1024),
    ):
        with pytest.raises(ConfigError) as e:
            A.check_layout(impl, layout, window, 2048)
        msg = str(e.value)
        assert "\n" not in msg and f"attention_impl={impl}" in msg and f"data.layout={layout}" in msg
    A.check_layout("blockwise", "shared_prefix", 1024, 2048)
    A.check_layout("splash", "packed", 1024, 2048)
    A.check_layout("splash", "shared_prefix", 4096, 2048)  # Mistral's window never bites at 2048
    with pytest.raises(ConfigError, match="needs a TPU"):
        A.splash_attention(*(jnp.zeros((1, 8, 2, 4)),) * 3, jnp.ones((1, 8), jnp.int32))


@pytest.mark.parametrize("rows,window", [(slice(None), None), (slice(0, 2), 5), (slice(0, 2), None)])
def test_splash_equals_einsum_values_and_gradients_in_interpret_mode(qkv, rows, window):
    """The real splash kernels (Pallas interpreter on CPU) against einsum: all four rows need the two-pass
    shared-prefix program; rows 0-1 (plain segments only) run the one-pass program, with and without a window."""
    seg, pos, _ = _layout()
    seg, pos = jnp.asarray(seg[rows]), jnp.asarray(pos[rows])
    assert_equals_einsum(
        lambda q, k, v: A.splash_attention(q, k, v, seg, window, interpret=True),
        [x[rows] for x in qkv],
        seg,
        pos,
        window,
        jit=False,
    )


def test_splash_shared_prefix_under_a_biting_window_is_nan_not_wrong(qkv):
    """The trainers refuse this configuration (check_layout); called directly, the kernel poisons the output
    instead of returning attention over the wrong keys."""
    q, k, v, _ = qkv
    seg, _, _ = _layout()
    out = A.splash_attention(q, k, v, jnp.asarray(seg), 5, interpret=True)
    assert np.isnan(np.asarray(out)).all()


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the `tpu` extra)")
def test_splash_compiles_for_a_tpu_topology():
    """Splash forward+backward with segment ids (both programs: plain segments and the two-pass shared prefix),
    sharded over a v5e-4 mesh, compiled ahead of time on CPU."""
    from jax.sharding import NamedSharding, PartitionSpec

    from starling_jax import aot
    from starling_jax.parallel import sharding

    devices, _ = aot.topology_devices("v5e-4")
    mesh = sharding.make_mesh(sharding.MeshConfig(), devices=devices)
    sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt, sharding=sh)  # noqa: E731

    def loss(q, k, v, seg):
        with sharding.activation_sharding(mesh):
            out = A.splash_attention(q, k, v, seg, 64, mesh=sharding.active_mesh())
        return jnp.sum(out.astype(jnp.float32))

    compiled = (
        jax.jit(jax.grad(loss, (0, 1, 2)))
        .lower(spec(8, 300, 8, 128), spec(8, 300, 4, 128), spec(8, 300, 4, 128), spec(8, 300, dt=jnp.int32))
        .compile()
    )
    assert "tpu_custom_call" in compiled.as_text()


def test_auto_resolves_from_the_platform_of_the_mesh(monkeypatch):
    """`auto` is splash on a TPU mesh, blockwise on a GPU one, einsum elsewhere (the TPU case through a real
    topology: tests/test_aot_tpu.py); explicit choices pass through."""
    from types import SimpleNamespace

    from starling_jax.parallel import sharding

    assert A.resolve("auto") == "einsum" and A.resolve("blockwise") == "blockwise"  # CPU here, no mesh
    for platform, impl in (("tpu", "splash"), ("gpu", "blockwise"), ("cpu", "einsum")):
        fake = SimpleNamespace(devices=np.array([SimpleNamespace(platform=platform)]))
        monkeypatch.setattr(sharding, "active_mesh", lambda fake=fake: fake)
        assert A.resolve("auto") == impl
        assert A.resolve("einsum") == "einsum"
    A.check_layout("auto", "shared_prefix", 4096, 2048)
    with pytest.raises(ConfigError, match="attention_impl=auto cannot handle"):
        A.check_layout("auto", "shared_prefix", 1024, 2048)


@pytest.mark.parametrize(
    "impl,remat,scan", [("einsum", "none", False), ("blockwise", "full", False), ("einsum", "full", True)]
)
def test_selected_rows_equal_the_full_forward_values_and_gradients(impl, remat, scan):
    """`Decoder(select=...)` (the reward model's last layer computes only the read tokens' rows) against the full
    forward read at the same tokens: packed rows, shared prefixes, padding, a biting window, 2 tokens per row."""
    seg, pos, _ = _layout()
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, 97, size=(N, L)) * (seg != 0), jnp.int32)
    last_real = [int(np.nonzero(row)[0][-1]) for row in seg]
    select = jnp.asarray([[3, t] for t in last_real], jnp.int32)  # [N, 2]
    # 2 layers: one ordinary layer before the last, which computes only the selected rows (unrolled) or is the
    # scan's last step (scanned)
    cfg = TINY.replace(
        num_hidden_layers=2, attention_impl=impl, attention_block=16, remat_policy=remat, scan_layers=scan
    )
    graphdef, params = nnx.split(build_model(cfg, "reward", seed=4))
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)

    def full(p):
        scores = nnx.merge(graphdef, p)(tokens, pos, seg)
        picked = jnp.take_along_axis(scores, select, axis=1)
        return jnp.sum(picked**2), picked

    def rows(p):
        model = nnx.merge(graphdef, p)
        picked = model.score(model.decoder(tokens, pos, seg, select=select))
        return jnp.sum(picked**2), picked

    (_, want), g_want = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
    (_, got), g_got = jax.jit(jax.value_and_grad(rows, has_aux=True))(params)
    assert got.shape == (N, 2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    # the reward model's `rewards` reads through the same path
    model = nnx.merge(graphdef, params)
    np.testing.assert_allclose(
        np.asarray(model.rewards(tokens, pos, seg, select[:, 1])), np.asarray(want[:, 1]), atol=1e-5, rtol=1e-5
    )


def test_blocks_resolve_by_platform_and_row_length():
    """`model.attention_block: 0`: on CPU the strip form (block_k None) with 64-token query blocks up to 512
    tokens, then 256-token blocks in the loop; 128 on GPU/TPU. An explicit length passes through as the loop's
    block; a negative one is a config error naming the key."""
    assert A.resolve_blocks(0, 256, "cpu") == (64, None) and A.resolve_blocks(0, 512, "cpu") == (64, None)
    assert A.resolve_blocks(0, 40, "cpu") == (64, None)  # blockwise_attention shrinks it to L
    assert A.resolve_blocks(0, 513, "cpu") == (256, 256) and A.resolve_blocks(0, 2048, "cpu") == (256, 256)
    assert A.resolve_blocks(0, 256, "gpu") == (128, 128) and A.resolve_blocks(0, 256, "tpu") == (128, 128)
    assert A.resolve_blocks(64, 256, "cpu") == (64, 64)
    assert A.resolve_blocks(0, 256) == ((64, None) if jax.default_backend() == "cpu" else (128, 128))
    with pytest.raises(ConfigError, match="model.attention_block=-1"):
        TINY.replace(attention_block=-1)
