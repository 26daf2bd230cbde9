"""The hydra reference (shared frozen bottom + copied top) against a full frozen copy of the initial policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from starling_jax.errors import ConfigError
from starling_jax.model.config import ModelConfig
from starling_jax.model.hydra import ReferenceTop, hydra_logits, hydra_param_counts
from tests.rl.fixtures import perturb, tiny_model

TINY = dict(
    model_type="mistral",
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=5,
)


def _n_params(module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _train_top(actor, num_layers_unfrozen):
    """Moves every trainable parameter (top layers, final norm, untied head) as training would; the embeddings and
    the bottom layers stay."""
    cfg = actor.cfg
    start = cfg.num_hidden_layers - num_layers_unfrozen

    def frozen(names):
        if names[:2] == ("decoder", "embed"):
            return True
        if names[:2] == ("decoder", "layers"):
            if cfg.scan_layers:  # stacked: rows [0, start) are frozen
                return np.arange(cfg.num_hidden_layers) < start
            return int(names[2]) < start
        return False

    perturb(actor, frozen)


@pytest.mark.parametrize("scan,tied,unfrozen", [(False, False, 1), (True, False, 2), (False, True, 3)])
def test_hydra_reference_equals_full_frozen_copy(scan, tied, unfrozen):
    cfg = ModelConfig(**TINY, scan_layers=scan, tie_word_embeddings=tied)
    actor = tiny_model(cfg, "causal_lm")
    full_reference = nnx.clone(actor)  # what a second frozen model would hold
    reference = ReferenceTop(actor, unfrozen)
    _train_top(actor, unfrozen)

    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, 96, size=(3, 11)), jnp.int32)
    lengths = np.array([11, 7, 4])
    segment_ids = jnp.asarray(np.arange(11)[None] < lengths[:, None], jnp.int32)
    positions = jnp.asarray(np.where(segment_ids, np.arange(11)[None], 0), jnp.int32)

    actor_logits, ref_logits = nnx.jit(hydra_logits)(actor, reference, tokens, positions, segment_ids)
    forward = nnx.jit(lambda model: model(tokens, positions, segment_ids))
    want_ref, want_actor = forward(full_reference), forward(actor)
    valid = np.asarray(segment_ids, bool)
    np.testing.assert_allclose(np.asarray(ref_logits)[valid], np.asarray(want_ref)[valid], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(actor_logits)[valid], np.asarray(want_actor)[valid], atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(actor_logits) - np.asarray(ref_logits))[valid].max() > 1e-3  # the top really moved

    # Memory: the reference holds N layers + final norm (+ untied head), as hydra_param_counts states.
    counts = hydra_param_counts(cfg, unfrozen)
    assert _n_params(reference) == counts["hydra_reference"]
    assert _n_params(full_reference) == counts["full_reference"]

    # Gradients reach only the actor's top: the frozen bottom gets none through the hydra forward.
    grads = nnx.jit(nnx.grad(lambda a: jnp.sum(hydra_logits(a, reference, tokens, positions, segment_ids)[0] ** 2)))(
        actor
    )
    if not scan and not tied:  # one backward compile is enough to show it
        start = cfg.num_hidden_layers - unfrozen
        assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(nnx.state(grads.decoder.layers[start - 1])))
        assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(nnx.state(grads.decoder.layers[start])))


def test_hydra_counts_for_mistral_7b_and_errors():
    cfg = ModelConfig()  # Mistral-7B-v0.1 shape
    counts = hydra_param_counts(cfg, 4)
    assert counts["full_reference"] == 7_241_732_096  # Mistral-7B-v0.1's published parameter count
    assert round(counts["hydra_reference"] / 1e9, 2) == 1.00 and round(counts["saved"] / 1e9, 2) == 6.24
    with pytest.raises(ConfigError, match="num_layers_unfrozen"):
        hydra_param_counts(cfg, 0)
