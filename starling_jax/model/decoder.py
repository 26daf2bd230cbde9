"""The Mistral / Llama-2 decoder in Flax NNX.

It returns the final-normed hidden states; heads (`heads.py`) turn them into logits, rewards or values, so the
reward model, policy, reference and critic all share this one trunk.

Axes (see ARCHITECTURE.md): N sequences, L length, D model width, H query heads, G KV heads, Dh head dim,
F MLP width, V vocabulary. Every parameter names its logical axes (`axes=`); `parallel/sharding.py` maps them to
the mesh.

Attention layout: token i attends to token j iff `segment_ids[i] == segment_ids[j] != 0`, `j <= i` and, with a
sliding window W, `i - j < W` (HF Mistral's rule). RoPE uses the explicit `positions`, so packed segments (several
answers in one row) restart their positions independently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from starling_jax.errors import ConfigError
from starling_jax.model.config import ModelConfig
from starling_jax.parallel.sharding import constrain

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
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


def rope(x, positions, theta: float):
    """Rotary embedding in the HF "rotate_half" layout. x: [N, L, heads, Dh], positions: [N, L]."""
    dh = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [N, L, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def attention_mask(segment_ids, sliding_window: int | None):
    """Boolean [N, 1, 1, L, L] mask (query, key) from segment ids (0 = padding), causality and the window."""
    length = segment_ids.shape[-1]
    q_idx = jnp.arange(length)[:, None]
    k_idx = jnp.arange(length)[None, :]
    allowed = k_idx <= q_idx
    if sliding_window is not None:
        allowed &= (q_idx - k_idx) < sliding_window
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
    return (same & allowed)[:, None, None, :, :]


def fused_attention(q, k, v, lengths, sliding_window: int | None, implementation: str | None = None):
    """Causal GQA attention through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU when the compute
    dtype is bf16/fp16; XLA otherwise). q: [N, L, H, Dh], k/v: [N, L, G, Dh], lengths: int [N] real tokens per
    row (one segment, right-padded). Outputs at padding positions are unread."""
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"model.attention_impl=cudnn needs a GPU (this backend is {jax.default_backend()}); "
                          "use fused or einsum")
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        local_window_size=(sliding_window - 1, 0) if sliding_window else None, implementation=implementation)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, g, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
        self.cfg = cfg
        self.q_proj = _init(cfg, rngs, (d, h, dh), ("embed", "q_heads", "head_dim"))
        self.k_proj = _init(cfg, rngs, (d, g, dh), ("embed", "kv_heads", "head_dim"))
        self.v_proj = _init(cfg, rngs, (d, g, dh), ("embed", "kv_heads", "head_dim"))
        self.o_proj = _init(cfg, rngs, (h, dh, d), ("q_heads", "head_dim", "embed"))

    def project_qkv(self, x, positions):
        """x [N, L, D] → q [N, L, H, Dh], k and v [N, L, G, Dh], RoPE applied to q and k."""
        cfg, dtype = self.cfg, self.cfg.jnp_dtype
        q = jnp.einsum("nld,dhk->nlhk", x, self.q_proj[...].astype(dtype))
        k = jnp.einsum("nld,dgk->nlgk", x, self.k_proj[...].astype(dtype))
        v = jnp.einsum("nld,dgk->nlgk", x, self.v_proj[...].astype(dtype))
        q = constrain(rope(q, positions, cfg.rope_theta), ("act_batch", "act_length", "act_heads", None))
        k = constrain(rope(k, positions, cfg.rope_theta), ("act_batch", "act_length", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))
        return q, k, v

    def project_out(self, out):
        out = constrain(out, ("act_batch", "act_length", "act_heads", None))
        return jnp.einsum("nlhk,hkd->nld", out, self.o_proj[...].astype(self.cfg.jnp_dtype))

    def __call__(self, x, positions, mask):
        cfg = self.cfg
        q, k, v = self.project_qkv(x, positions)
        if cfg.attention_from_lengths:  # `mask` holds the per-row lengths here
            out = fused_attention(q, k, v, mask, cfg.sliding_window,
                                  "cudnn" if cfg.attention_impl == "cudnn" else None)
        else:
            out = gqa_attention(q, [(k, v, mask)])
        return self.project_out(out)

    def cached(self, x, positions, cache, self_mask):
        """Attention of the new tokens x [N, L, D] over the cached keys plus themselves (prefill: L prompt tokens
        and `cache=None`; decode: L = 1). cache: (k, v [N, S, G, Dh], mask [N, 1, 1, L, S]) or None; self_mask
        [N, 1, 1, L, L]. → (output [N, L, D], the new k, v [N, L, G, Dh] for the caller to store)."""
        q, k, v = self.project_qkv(x, positions)
        blocks = [(k, v, self_mask)] if cache is None else [cache, (k, v, self_mask)]
        return self.project_out(gqa_attention(q, blocks)), k, v


def gqa_attention(q, blocks):
    """Softmax attention of q [N, Lq, H, Dh] over the keys of all `blocks` jointly; a block is (k [N, Lk, G, Dh],
    v [N, Lk, G, Dh], mask broadcastable to [N, 1, 1, Lq, Lk]). The H = G·R query heads read their KV head
    through a [G, R] reshape of q, never a repeated copy of k/v. Several blocks let a decode step attend over a
    KV cache and the new token without concatenating (copying) the cache."""
    n, lq, h, dh = q.shape
    g = blocks[0][0].shape[2]
    q = q.reshape(n, lq, g, h // g, dh)
    # Scores and softmax in float32 for stability; a fully masked (padding) query row gets uniform weights
    # over finite logits instead of NaN, and its output is never read.
    scale = jnp.sqrt(dh).astype(jnp.float32)
    scores = [jnp.where(mask, jnp.einsum("nqgrk,nsgk->ngrqs", q, k, preferred_element_type=jnp.float32) / scale,
                        jnp.finfo(jnp.float32).min) for k, _, mask in blocks]
    sizes = [s.shape[-1] for s in scores]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0], axis=-1)
    probs = probs.astype(q.dtype)
    out, start = 0, 0
    for (_, v, _), size in zip(blocks, sizes):
        out = out + jnp.einsum("ngrqs,nsgk->nqgrk", probs[..., start:start + size], v)
        start += size
    return out.reshape(n, lq, h, dh)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.cfg = cfg
        self.gate_proj = _init(cfg, rngs, (d, f), ("embed", "mlp"))
        self.up_proj = _init(cfg, rngs, (d, f), ("embed", "mlp"))
        self.down_proj = _init(cfg, rngs, (f, d), ("mlp", "embed"))

    def __call__(self, x):
        dtype = self.cfg.jnp_dtype
        gate = x @ self.gate_proj[...].astype(dtype)
        up = x @ self.up_proj[...].astype(dtype)
        hidden = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        return hidden @ self.down_proj[...].astype(dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, mask):
        x = x + self.attn(self.attn_norm(x), positions, mask)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("act_batch", "act_length", "act_embed"))

    def cached(self, x, positions, cache, self_mask):
        """The same layer over new tokens with a KV cache (see `Attention.cached`) → (x, k, v)."""
        out, k, v = self.attn.cached(self.attn_norm(x), positions, cache, self_mask)
        x = x + out
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("act_batch", "act_length", "act_embed")), k, v


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

    def embed_tokens(self, tokens):
        # Gather from a table whose vocabulary is whole on every device (cast first: half the bytes in bf16);
        # a gather from a vocab-sharded table makes SPMD replicate it anyway, less efficiently.
        table = constrain(self.embed[...].astype(self.cfg.jnp_dtype), (None, None))
        return jnp.take(table, tokens, axis=0)

    def __call__(self, tokens, positions, segment_ids):
        """tokens, positions, segment_ids: int [N, L] → hidden states [N, L, D] (compute dtype)."""
        cfg = self.cfg
        if cfg.attention_from_lengths:  # the kernel builds causal + window + padding masks from row lengths
            mask = jnp.sum(segment_ids != 0, axis=-1).astype(jnp.int32)
        else:
            mask = attention_mask(segment_ids, cfg.sliding_window)
        x = constrain(self.embed_tokens(tokens), ("act_batch", "act_length", "act_embed"))

        def apply_layer(layer, x):
            return layer(x, positions, mask)

        if cfg.remat_policy != "none":
            apply_layer = nnx.remat(apply_layer, policy=REMAT[cfg.remat_policy], prevent_cse=not cfg.scan_layers)

        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(x, layer_state):
                return apply_layer(nnx.merge(graphdef, layer_state), x), None

            x, _ = jax.lax.scan(body, x, stacked)
        else:
            for layer in self.layers:
                x = apply_layer(layer, x)
        return self.final_norm(x)

    def cached(self, tokens, positions, cache, self_mask):
        """Forward of new tokens [N, L] against a KV cache (the sampler's prefill and decode steps).

        cache: None (prefill) or (k, v [num_layers, N, S, G, Dh], mask [N, 1, 1, L, S]: which cached keys each
        new token sees); self_mask [N, 1, 1, L, L]: which new tokens each new token sees.
        → (hidden [N, L, D], k, v [num_layers, N, L, G, Dh]: the new tokens' keys/values; storing them is the
        caller's job, so the cache stays one buffer updated in place by the decode loop).
        """
        x = constrain(self.embed_tokens(tokens), ("act_batch", "act_length", "act_embed"))
        if self.cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(x, xs):
                layer_state, layer_cache = xs
                layer_cache = None if layer_cache is None else (*layer_cache, cache[2])
                x, k, v = nnx.merge(graphdef, layer_state).cached(x, positions, layer_cache, self_mask)
                return x, (k, v)

            x, (k, v) = jax.lax.scan(body, x, (stacked, None if cache is None else cache[:2]))
        else:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else (cache[0][i], cache[1][i], cache[2])
                x, k, v = layer.cached(x, positions, layer_cache, self_mask)
                ks.append(k)
                vs.append(v)
            k, v = jnp.stack(ks), jnp.stack(vs)
        return self.final_norm(x), k, v
