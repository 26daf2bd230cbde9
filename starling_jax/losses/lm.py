"""Next-token (causal LM) loss on masked targets: pure functions, float32 inside."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_token_nll(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row summed negative log-likelihood of the masked next tokens, and their count.

        nll_b = Σ_{t ≥ 1} m_{b,t} · (logsumexp_v z_{b,t-1,v} − z_{b,t-1,x_{b,t}}),   n_b = Σ_{t ≥ 1} m_{b,t}

    logits z [B, L, V] (position t-1 predicts token t), tokens x [B, L], loss_mask m [B, L] (True on the tokens
    to predict: the assistant's answer and its end-of-turn; the prompt and padding are False). → (nll [B], n [B]),
    float32. Masking is a select, so a masked position with non-finite logits cannot leak into the sum.
    """
    z = logits[:, :-1].astype(jnp.float32)
    target = tokens[:, 1:]
    mask = loss_mask[:, 1:]
    nll = jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, target[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = jnp.where(mask, nll, 0.0)
    return nll.sum(axis=-1), mask.sum(axis=-1).astype(jnp.float32)
