"""The Mistral / Llama-2 decoder in Flax NNX.

It returns the final-normed hidden states; heads (`heads.py`) turn them into logits, rewards or values, so the
reward model, policy, reference and critic all share this one trunk.

Axes (see ARCHITECTURE.md): N sequences, L length, D model width, H query heads, G KV heads, Dh head dim,
F MLP width, V vocabulary. Every parameter names its logical axes (`axes=`); `parallel/sharding.py` maps them to
the mesh.

Attention layout: the rule of `model/attention/rule.py` (segments, shared prefixes, causality, HF Mistral's
sliding window), computed by the registry entry `cfg.attention_impl` names (`model/attention/registry.py`).
RoPE uses the explicit `positions`, so packed segments (several answers in one row) restart their positions
independently and shared-prefix answers continue from their prompt.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from starling_jax.model import attention, grad_sink
from starling_jax.model.config import ModelConfig
from starling_jax.parallel.sharding import constrain

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # full, but each layer's input (what full remat keeps: [layers, N, L, D] under scan) goes to host memory
    # between the forward and the backward instead of staying in HBM
    "full_offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=["layer_input"],
        offload_src="device",
        offload_dst="pinned_host",
    ),
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _init(cfg: ModelConfig, rngs: nnx.Rngs, shape, axes, scale: float | None = None):
    std = cfg.initializer_range if scale is None else scale
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(cfg.jnp_param_dtype), axes=axes)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x²) + eps) · scale, computed in float32 (as HF does), returned in the input dtype."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.eps = cfg.rms_norm_eps
        self.scale = nnx.Param(jnp.ones((cfg.hidden_size,), cfg.jnp_param_dtype), axes=("norm",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(jnp.float32) * x32).astype(x.dtype)


def dense(x, w, contract: int = 1):
    """x [..., *w.shape[:contract]] · w → [..., *w.shape[contract:]], computed as one 2-D matmul
    [tokens, in] @ [in, out] between reshapes (bitcasts: the merged axes are adjacent and row-major).

    The same product as `jnp.einsum`, but the backward's weight gradient stays a plain 2-D dot: from a 3-D
    [N, L, D] operand XLA:CPU canonicalises it by first copying both [N, L, ·] operands into transposed
    [·, N, L] buffers (the MLP's fp32 forward+backward on this CPU: 300 ms with einsum, 212 ms in 2-D,
    BENCHMARKS.md). On CPU only: on TPU the 2-D form raised the 7B recipe's per-chip temporaries (v5e-32,
    tensor 2: +0.46 GiB), so other platforms keep the einsum's single dot_general (`jnp.tensordot` lowers to the
    same StableHLO op, forward and backward)."""
    if attention.trace_platform() != "cpu":
        return jnp.tensordot(x, w, axes=contract)
    k = math.prod(w.shape[:contract])
    lead, out = x.shape[: x.ndim - contract], w.shape[contract:]
    return (x.reshape(-1, k) @ w.reshape(k, -1)).reshape(*lead, *out)


class Rotary(NamedTuple):
    """RoPE's cos and sin for every token, [N, L, 1, Dh] in the compute dtype (`rotary`)."""

    cos: jax.Array
    sin: jax.Array


def rotary(positions, head_dim: int, theta: float, dtype) -> Rotary:
    """RoPE tables for positions [N, L], as HF computes them: the angles and their cos/sin in float32, cast to the
    compute dtype. Computed once per forward pass and handed to every layer: computed inside a layer, XLA fuses
    the cos/sin into each consumer and evaluates them once per head and again in the backward (the CPU attention
    block's forward+backward spent ~40% on them at Dh 32, BENCHMARKS.md)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [N, L, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return Rotary(jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype))


def rope(x, rot: Rotary):
    """Rotary embedding in the HF "rotate_half" layout: x·cos + rotate_half(x)·sin in x's dtype, x [N, L, heads,
    Dh]. (In bf16 that keeps the rotated q and k in bf16 instead of float32 copies of [N, L, heads, Dh]: a few of
    those per layer were live in the 7B backward.)"""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * rot.cos + rotated * rot.sin


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, g, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
        self.cfg = cfg
        self.q_proj = _init(cfg, rngs, (d, h, dh), ("embed", "q_heads", "head_dim"))
        self.k_proj = _init(cfg, rngs, (d, g, dh), ("embed", "kv_heads", "head_dim"))
        self.v_proj = _init(cfg, rngs, (d, g, dh), ("embed", "kv_heads", "head_dim"))
        self.o_proj = _init(cfg, rngs, (h, dh, d), ("q_heads", "head_dim", "embed"))

    def project_q(self, x, rot: Rotary):
        """x [N, L, D] → q [N, L, H, Dh] with RoPE (`rot`, see `rotary`)."""
        q = dense(x, self.q_proj[...].astype(self.cfg.jnp_dtype))
        return constrain(rope(q, rot), ("act_batch", "act_length", "act_heads", None))

    def project_kv(self, x, rot: Rotary):
        """x [N, L, D] → k (with RoPE) and v, [N, L, G, Dh]."""
        dtype = self.cfg.jnp_dtype
        k = dense(x, self.k_proj[...].astype(dtype))
        v = dense(x, self.v_proj[...].astype(dtype))
        k = constrain(rope(k, rot), ("act_batch", "act_length", "act_kv_heads", None))
        return k, constrain(v, ("act_batch", "act_length", "act_kv_heads", None))

    def project_qkv(self, x, rot: Rotary):
        """x [N, L, D] → q [N, L, H, Dh], k and v [N, L, G, Dh], RoPE applied to q and k."""
        return self.project_q(x, rot), *self.project_kv(x, rot)

    def project_out(self, out):
        out = constrain(out, ("act_batch", "act_length", "act_heads", None))
        return dense(out, self.o_proj[...].astype(self.cfg.jnp_dtype), contract=2)

    def __call__(self, x, rot, mask):
        cfg = self.cfg
        q, k, v = self.project_qkv(x, rot)
        return self.project_out(attention.attend(cfg, q, k, v, mask))  # `mask`: what attention.prepare built

    def rows(self, x, rot, rows_mask, select):
        """Attention output [N, Q, D] of the tokens `select` [N, Q] over the keys of all of x [N, L, D], through
        the implementation's cached path (`attention.attend_cached`; the reference's einsum form: Q·L scores per
        head, tiny next to L·L)."""
        k, v = self.project_kv(x, rot)
        q = self.project_q(attention.take_rows(x, select), Rotary(*(attention.take_rows(t, select) for t in rot)))
        return self.project_out(attention.attend_cached(self.cfg, q, [(k, v, rows_mask)]))

    def cached(self, x, rot, cache, self_mask):
        """Attention of the new tokens x [N, L, D] over the cached keys plus themselves (prefill: L prompt tokens
        and `cache=None`; decode: L = 1). cache: (k, v [N, G, S, Dh] (heads first), mask [N, 1, 1, L, S]) or
        None; self_mask [N, 1, 1, L, L]. The implementation's cached path attends (`attention.attend_cached`).
        → (output [N, L, D], the new k, v [N, L, G, Dh] for the caller to store)."""
        q, k, v = self.project_qkv(x, rot)
        if cache is None and isinstance(self_mask, tuple):  # prefill with what attention.prepare built (blockwise,
            return self.project_out(attention.attend(self.cfg, q, k, v, self_mask)), k, v  # splash): no [L, L] scores
        blocks = [(k, v, self_mask)] if cache is None else [(*cache, True), (k, v, self_mask)]
        return self.project_out(attention.attend_cached(self.cfg, q, blocks)), k, v

    def decode(self, x, rot, cache_k, cache_v, visible, index):
        """One decode step (x [N, 1, D]) that first writes its key/value at cache index `index` of this layer's
        heads-first cache [N, G, S, Dh], then attends over the updated cache (`visible` [N, 1, 1, 1, S] includes
        `index`). Writing before reading lets XLA update the buffer in place (nothing reads the old cache) and
        leaves one attention block instead of cache + new token. → (output [N, 1, D], cache_k, cache_v)."""
        q, k, v = self.project_qkv(x, rot)
        write = lambda cache, new: jax.lax.dynamic_update_slice(
            cache, new.transpose(0, 2, 1, 3).astype(cache.dtype), (0, 0, index, 0)
        )
        cache_k, cache_v = write(cache_k, k), write(cache_v, v)
        out = attention.attend_cached(self.cfg, q, [(cache_k, cache_v, visible, True)])
        return self.project_out(out), cache_k, cache_v


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.cfg = cfg
        self.gate_proj = _init(cfg, rngs, (d, f), ("embed", "mlp"))
        self.up_proj = _init(cfg, rngs, (d, f), ("embed", "mlp"))
        self.down_proj = _init(cfg, rngs, (f, d), ("mlp", "embed"))

    def __call__(self, x):
        """x [N, L, D] → [N, L, D]; in `cfg.mlp_chunks` chunks of the sequence when L allows (`swiglu_chunked`)."""
        dtype = self.cfg.jnp_dtype
        weights = tuple(w[...].astype(dtype) for w in (self.gate_proj, self.up_proj, self.down_proj))
        chunks = math.gcd(x.shape[-2], self.cfg.mlp_chunks)
        if chunks == 1:
            return swiglu(x, *weights)
        return swiglu_chunked(x, weights, chunks, REMAT.get(self.cfg.remat_policy))


def swiglu(x, gate_w, up_w, down_w):
    hidden = constrain(jax.nn.silu(dense(x, gate_w)) * dense(x, up_w), ("act_batch", "act_length", "act_mlp"))
    return dense(hidden, down_w)


def swiglu_chunked(x, weights, chunks: int, policy):
    """`swiglu` over `chunks` equal slices of the sequence axis, one after the other (`lax.map`), each slice under
    `jax.checkpoint(policy)`: its backward recomputes only that slice's gate/up/hidden [N, L/chunks, F]. The MLP
    is position-wise, so the result is the same; only the peak of one layer's MLP activations changes. Without a
    remat policy (`policy=None`) the map saves every slice's activations for the backward, as the whole MLP does."""
    n, length, d = x.shape
    slices = x.reshape(n, chunks, length // chunks, d).swapaxes(0, 1)  # [chunks, N, L/chunks, D]
    body = (
        (lambda xs: swiglu(xs, *weights))
        if policy is None
        else jax.checkpoint(lambda xs: swiglu(xs, *weights), policy=policy)
    )
    out = jax.lax.map(body, slices)
    return constrain(out.swapaxes(0, 1).reshape(n, length, d), ("act_batch", "act_length", "act_embed"))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, rot, mask):
        x = x + self.attn(self.attn_norm(x), rot, mask)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("act_batch", "act_length", "act_embed"))

    def rows(self, x, rot, rows_mask, select):
        """The layer's output at the tokens `select` [N, Q] only → [N, Q, D]. Keys and values come from every
        token (`Attention.rows`); rows_mask [N, 1, 1, Q, L] (`attention.rows_mask`) says which each selected
        query sees."""
        x_rows = attention.take_rows(x, select) + self.attn.rows(self.attn_norm(x), rot, rows_mask, select)
        return x_rows + self.mlp(self.mlp_norm(x_rows))

    def cached(self, x, rot, cache, self_mask):
        """The same layer over new tokens with a KV cache (see `Attention.cached`) → (x, k, v)."""
        out, k, v = self.attn.cached(self.attn_norm(x), rot, cache, self_mask)
        x = x + out
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("act_batch", "act_length", "act_embed")), k, v

    def decode(self, x, rot, cache_k, cache_v, visible, index):
        """The layer for one decode step that writes its cache first (see `Attention.decode`)."""
        out, cache_k, cache_v = self.attn.decode(self.attn_norm(x), rot, cache_k, cache_v, visible, index)
        x = x + out
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("act_batch", "act_length", "act_embed")), cache_k, cache_v


def _call_layer(layer: DecoderLayer, x, context):
    rot, mask = context
    return layer(x, rot, mask)


def cast_projections(stacked: nnx.State, dtype) -> nnx.State:
    """The stacked layers' projection matrices (`*_proj`) in the compute dtype, cast once before the layer scan.

    The layers cast them at use (`w[...].astype(dtype)`), so values and gradients stay bit-identical; what moves is
    the cast's transpose in the backward: outside the scan, so the scan stacks each layer's weight gradient in the
    compute dtype (the dtype the matmul's transpose produces it in anyway) and one convert to the parameter dtype
    follows. With bf16 compute and float32 parameters that halves the per-micro-batch gradient buffer of the
    matrices (the 7B recipes: −0.9 GiB per chip, BENCHMARKS.md). The norm scales, used in float32, keep theirs."""

    def cast(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        return leaf.astype(dtype) if any(isinstance(n, str) and n.endswith("_proj") for n in names) else leaf

    return jax.tree_util.tree_map_with_path(cast, stacked)


class Decoder(nnx.Module):
    """Token embeddings → N × (RMSNorm, GQA attention, RMSNorm, SwiGLU) → final RMSNorm."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _init(cfg, rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        if cfg.scan_layers:
            # One stacked layer whose parameters carry a leading [num_layers] axis, applied with lax.scan:
            # compile time independent of depth.
            @nnx.split_rngs(splits=cfg.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_layers(rngs):
                return DecoderLayer(cfg, rngs)

            self.layers = make_layers(rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        self.final_norm = RMSNorm(cfg, rngs)

    def rotary(self, positions) -> Rotary:
        """The RoPE tables of positions [N, L] for every layer (see `rotary`)."""
        cfg = self.cfg
        return rotary(positions, cfg.resolved_head_dim, cfg.rope_theta, cfg.jnp_dtype)

    def embed_tokens(self, tokens):
        # Gather from a table whose vocabulary is whole on every device (cast first: half the bytes in bf16);
        # a gather from a vocab-sharded table makes SPMD replicate it anyway, less efficiently.
        table = constrain(self.embed[...].astype(self.cfg.jnp_dtype), (None, None))
        return jnp.take(table, tokens, axis=0)

    def __call__(self, tokens, positions, segment_ids, select=None):
        """tokens, positions, segment_ids: int [N, L] → hidden states [N, L, D] (compute dtype).

        select: int [N, Q] or None. Given, → the hidden states of those tokens only, [N, Q, D], and the last layer
        computes only their rows (`DecoderLayer.rows`): the reward model reads one token per sequence, so its
        last layer's queries, attention output, residual and MLP for every other token are never needed (a
        1/num_layers share of the forward and backward). With scanned layers all rows are computed and then
        selected (the last layer is inside the scan)."""
        cfg = self.cfg
        mask = attention.prepare(cfg, segment_ids, positions)
        rot = self.rotary(positions)
        x = constrain(self.embed_tokens(tokens), ("act_batch", "act_length", "act_embed"))

        def apply_layer(layer, x):
            return layer(checkpoint_name(x, "layer_input"), rot, mask)

        def apply_rows(layer, x):
            rows_mask = attention.rows_mask(segment_ids, positions, select, cfg.sliding_window)
            return layer.rows(checkpoint_name(x, "layer_input"), rot, rows_mask, select)

        if cfg.remat_policy != "none":
            apply_layer = nnx.remat(apply_layer, policy=REMAT[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
            apply_rows = nnx.remat(apply_rows, policy=REMAT[cfg.remat_policy], prevent_cse=True)
        if select is not None and not cfg.scan_layers:
            *layers, last = self.layers
            for layer in layers:
                x = apply_layer(layer, x)
            return self.final_norm(apply_rows(last, x))

        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)
            # under a gradient sink (train.step), full remat's backward adds each layer's gradient in place
            acc = grad_sink.take(stacked) if cfg.remat_policy in ("full", "full_offload") else None
            stacked = cast_projections(stacked, cfg.jnp_dtype)
            if acc is not None:
                x = grad_sink.scan_layers(
                    _call_layer,
                    graphdef,
                    stacked,
                    acc,
                    x,
                    (rot, mask),
                    offload=cfg.remat_policy == "full_offload",
                    saved_axes=("act_batch", "act_saved_length", "act_embed"),
                    input_axes=("act_batch", "act_length", "act_embed"),
                )
                return self.final_norm(x if select is None else attention.take_rows(x, select))

            def body(x, layer_state):
                return apply_layer(nnx.merge(graphdef, layer_state), x), None

            x, _ = jax.lax.scan(body, x, stacked)
        else:
            for layer in self.layers:
                x = apply_layer(layer, x)
        return self.final_norm(x if select is None else attention.take_rows(x, select))

    def cached(self, tokens, positions, cache, self_mask):
        """Forward of new tokens [N, L] against a KV cache (the sampler's prefill and decode steps).

        cache: None (prefill) or (k, v, mask [N, 1, 1, L, S]: which cached keys each new token sees); k and v are
        [num_layers, N, G, S, Dh] arrays with scanned layers, else sequences of num_layers [N, G, S, Dh] arrays
        (separate buffers: no per-step slicing copy of a stacked cache). self_mask [N, 1, 1, L, L]: which new
        tokens each new token sees.
        → (hidden [N, L, D], k, v [num_layers, N, L, G, Dh]: the new tokens' keys/values; storing them is the
        caller's job, so the cache stays one buffer updated in place by the decode loop).
        """
        x = constrain(self.embed_tokens(tokens), ("act_batch", "act_length", "act_embed"))
        rot = self.rotary(positions)
        if self.cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(x, xs):
                layer_state, layer_cache = xs
                layer_cache = None if layer_cache is None else (*layer_cache, cache[2])
                x, k, v = nnx.merge(graphdef, layer_state).cached(x, rot, layer_cache, self_mask)
                return x, (k, v)

            x, (k, v) = jax.lax.scan(body, x, (stacked, None if cache is None else cache[:2]))
        else:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else (cache[0][i], cache[1][i], cache[2])
                x, k, v = layer.cached(x, rot, layer_cache, self_mask)
                ks.append(k)
                vs.append(v)
            k, v = jnp.stack(ks), jnp.stack(vs)
        return self.final_norm(x), k, v

    def decode(self, tokens, positions, cache_k, cache_v, visible, index):
        """One decode step of tokens [N, 1] over per-layer heads-first caches (sequences of [N, G, S, Dh], layers
        not scanned): each layer writes its new key/value at `index`, then attends over its cache (`visible`
        [N, 1, 1, 1, S], index included). → (hidden [N, 1, D], cache_k, cache_v as tuples)."""
        x = constrain(self.embed_tokens(tokens), ("act_batch", "act_length", "act_embed"))
        rot = self.rotary(positions)
        new_k, new_v = [], []
        for layer, ck, cv in zip(self.layers, cache_k, cache_v):
            x, ck, cv = layer.decode(x, rot, ck, cv, visible, index)
            new_k.append(ck)
            new_v.append(cv)
        return self.final_norm(x), tuple(new_k), tuple(new_v)
