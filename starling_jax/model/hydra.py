"""The "hydra" reference policy (trlx's layout): one frozen trunk, two heads of N layers.

With `num_layers_unfrozen = N` the actor trains only its top N decoder layers, final norm and LM head; its token
embeddings and bottom L − N layers stay at their initial values. The reference policy (the initial actor) is
therefore the actor's own bottom plus a frozen copy of the top, so it keeps only

    ReferenceTop = copy of (layers[L−N:], final_norm, lm_head)      (lm_head shared when embeddings are tied)

instead of a second full model, and one forward runs the shared bottom once:

    h      = stop_gradient(layers[:L−N](embed(tokens)))         shared, frozen
    actor  = lm_head(final_norm(layers[L−N:](h)))               trainable top
    ref    = lm_headᵣ(final_normᵣ(layersᵣ(h)))                  frozen copy of the top at initialization

Memory (parameters of the reference): full copy V·D + L·P_layer + D + V·D (untied) vs hydra N·P_layer + D + V·D.
For Mistral-7B (V 32000, D 4096, P_layer ≈ 218.1M, L 32) with N = 4: 7.24B → 1.00B parameters, i.e. 6.24B fewer
(12.5 GB in bf16, 86%), and the reference forward costs the top 4 layers instead of 32 (`hydra_param_counts`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from starling_jax.errors import ConfigError
from starling_jax.model import attention
from starling_jax.model.config import ModelConfig
from starling_jax.model.decoder import REMAT
from starling_jax.model.heads import CausalLM
from starling_jax.parallel.sharding import constrain


def check_unfrozen(cfg: ModelConfig, num_layers_unfrozen: int) -> int:
    """The index L − N of the first trainable layer; 1 ≤ N ≤ L required for a hydra reference."""
    if not 1 <= num_layers_unfrozen <= cfg.num_hidden_layers:
        raise ConfigError(
            f"rl.num_layers_unfrozen={num_layers_unfrozen}: a hydra reference needs 1 <= N <= "
            f"{cfg.num_hidden_layers} (the policy's layers); use -1 for a full frozen reference copy"
        )
    return cfg.num_hidden_layers - num_layers_unfrozen


class ReferenceTop(nnx.Module):
    """A frozen copy of the actor's top N layers, final norm and (untied) LM head, taken at construction."""

    def __init__(self, actor: CausalLM, num_layers_unfrozen: int):
        cfg = actor.cfg
        start = check_unfrozen(cfg, num_layers_unfrozen)
        self.cfg = cfg
        self.num_layers_unfrozen = num_layers_unfrozen
        if cfg.scan_layers:  # one stacked layer: keep the rows [L−N:] of every stacked parameter
            graphdef, stacked = nnx.split(actor.decoder.layers)
            self.layers = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.array(a[start:]), stacked))
        else:
            self.layers = nnx.List([nnx.clone(layer) for layer in list(actor.decoder.layers)[start:]])
        self.final_norm = nnx.clone(actor.decoder.final_norm)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.clone(actor.lm_head)


def apply_layers(cfg: ModelConfig, layers, x, rot, mask, start: int = 0, stop: int | None = None):
    """Runs decoder layers [start, stop) of `layers` (an nnx.List, or one stacked layer when cfg.scan_layers) on
    hidden states x [N, L, D]: the loop of `Decoder.__call__` restricted to a slice of the stack. rot: the RoPE
    tables (`Decoder.rotary`), mask: what `attention.prepare` built."""

    def apply_layer(layer, x):
        return layer(x, rot, mask)

    if cfg.remat_policy != "none":
        apply_layer = nnx.remat(apply_layer, policy=REMAT[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        graphdef, stacked = nnx.split(layers)
        stacked = jax.tree.map(lambda a: a[start:stop], stacked)

        def body(x, layer_state):
            return apply_layer(nnx.merge(graphdef, layer_state), x), None

        x, _ = jax.lax.scan(body, x, stacked)
        return x
    for layer in list(layers)[start:stop]:
        x = apply_layer(layer, x)
    return x


def _decoder_inputs(actor: CausalLM, tokens, positions, segment_ids):
    cfg = actor.cfg
    mask = attention.prepare(cfg, segment_ids, positions)
    x = constrain(actor.decoder.embed_tokens(tokens), ("act_batch", "act_length", "act_embed"))
    return x, (actor.decoder.rotary(positions), mask)


def _logits(cfg: ModelConfig, hidden, head_owner, embed):
    """The LM head of `head_owner` (actor or reference top), or the shared embedding when tied."""
    logits = hidden @ embed[...].astype(hidden.dtype).T if cfg.tie_word_embeddings else head_owner.lm_head(hidden)
    return constrain(logits.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))


def hydra_logits(actor: CausalLM, reference: ReferenceTop, tokens, positions, segment_ids):
    """→ (actor logits, reference logits), both [N, L, V] float32, from one pass through the shared bottom.
    Gradients reach only the actor's top (the bottom is frozen, so its activations are stop-gradient)."""
    cfg = actor.cfg
    start = cfg.num_hidden_layers - reference.num_layers_unfrozen
    x, (rot, mask) = _decoder_inputs(actor, tokens, positions, segment_ids)
    shared = jax.lax.stop_gradient(apply_layers(cfg, actor.decoder.layers, x, rot, mask, 0, start))
    actor_hidden = actor.decoder.final_norm(apply_layers(cfg, actor.decoder.layers, shared, rot, mask, start))
    ref_hidden = reference.final_norm(apply_layers(cfg, reference.layers, shared, rot, mask))
    actor_logits = _logits(cfg, actor_hidden, actor, actor.decoder.embed)
    ref_logits = _logits(cfg, ref_hidden, reference, actor.decoder.embed)
    return actor_logits, jax.lax.stop_gradient(ref_logits)


def actor_logits(actor: CausalLM, tokens, positions, segment_ids, frozen_layers: int):
    """The actor's logits [N, L, V] with its bottom `frozen_layers` layers (and embeddings) outside the gradient:
    equal to `actor(...)`, without the backward pass through layers that never train."""
    cfg = actor.cfg
    x, (rot, mask) = _decoder_inputs(actor, tokens, positions, segment_ids)
    shared = jax.lax.stop_gradient(apply_layers(cfg, actor.decoder.layers, x, rot, mask, 0, frozen_layers))
    hidden = actor.decoder.final_norm(apply_layers(cfg, actor.decoder.layers, shared, rot, mask, frozen_layers))
    return _logits(cfg, hidden, actor, actor.decoder.embed)


def hydra_param_counts(cfg: ModelConfig, num_layers_unfrozen: int) -> dict[str, int]:
    """Parameter counts of a full frozen reference copy vs the hydra top (module docstring), and the saving."""
    check_unfrozen(cfg, num_layers_unfrozen)
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, g, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
    per_layer = d * h * dh * 2 + d * g * dh * 2 + 3 * d * f + 2 * d
    head = 0 if cfg.tie_word_embeddings else v * d
    full = v * d + cfg.num_hidden_layers * per_layer + d + head
    hydra = num_layers_unfrozen * per_layer + d + head
    return {"full_reference": full, "hydra_reference": hydra, "saved": full - hydra}
