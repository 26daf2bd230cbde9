"""Adding an attention implementation is one registry entry (model/attention/registry.py).

A toy implementation, registered for one test only, is accepted by the existing config validation and used by
the decoder's forward, the sampler's prefill and decode steps, and `aot`'s compiled train step and report, with
no other edit. The toy is marked: its attention output is zero (no token sees any other, itself included), so a
decoder that really runs it computes every token's hidden state from that token alone, which the tests check
against forwards of one-token rows; the reference (einsum) visibly does not.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from starling_jax import aot
from starling_jax.config import load_config
from starling_jax.errors import ConfigError
from starling_jax.model import attention as A
from starling_jax.model.config import ModelConfig
from starling_jax.model.heads import build_model
from starling_jax.sample.engine import SamplingConfig, make_sampler
from starling_jax.train.rm_config import DataConfig, RMRunConfig
from starling_jax.train.runtime import RuntimeConfig

TOY = "toy_no_context"
CALLS: collections.Counter = collections.Counter()  # what the toy was asked to do, counted when traced
CFG = ModelConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=6,
    pad_token_id=0,
)


def _prepare(cfg, segment_ids, positions):
    CALLS["prepare"] += 1
    return A.attention_mask(segment_ids, positions, cfg.sliding_window)


def _attend(cfg, q, k, v, mask):
    CALLS["attend"] += 1
    return 0.0 * A.einsum_attention(q, k, v, mask & False)  # the reference's form, every key masked, output 0


def _attend_cached(cfg, q, blocks):
    CALLS[f"cached {q.shape[1]} queries"] += 1
    return 0.0 * A.gqa_attention(q, blocks)


@pytest.fixture
def toy():
    """The toy registered for one test: the registry is all that changes."""
    entry = A.Implementation(
        name=TOY,
        layouts=frozenset({"per_answer"}),
        platforms=None,
        prepare=_prepare,
        attend=_attend,
        attend_cached=_attend_cached,
    )
    CALLS.clear()
    with A.registered(entry):
        yield entry
    assert TOY not in A.names()


def test_config_validation_reads_the_registry(toy):
    cfg = CFG.replace(attention_impl=TOY)  # ModelConfig's own check, unedited
    assert cfg.attention_impl == TOY and TOY in A.names()
    RMRunConfig(runtime=RuntimeConfig(attention_impl=TOY))
    with pytest.raises(ConfigError, match=f"attention_impl={TOY} cannot handle data.layout=packed"):
        RMRunConfig(data=DataConfig(packing=True), runtime=RuntimeConfig(attention_impl=TOY))
    with pytest.raises(ValueError, match="already registered"):
        A.register(toy)
    assert A.resolve(TOY, "tpu") == TOY and A.select(TOY).name == TOY


def test_an_unregistered_name_is_a_config_error():
    with pytest.raises(ConfigError, match=f"attention_impl='{TOY}': choose one of"):
        CFG.replace(attention_impl=TOY)


def _tokens(n=3, length=10, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, CFG.vocab_size, size=(n, length)), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _one_token_rows(graphdef, params, tokens):
    """The model's hidden states of every token as a row of its own: [N, L, D]."""
    n, length = tokens.shape
    flat = tokens.reshape(n * length, 1)
    zeros, ones = jnp.zeros_like(flat), jnp.ones_like(flat)
    return nnx.merge(graphdef, params).decoder(flat, zeros, ones).reshape(n, length, -1)


@functools.partial(jax.jit, static_argnums=0)
def _next_alone(graphdef, params, tokens):
    """Greedy next token [N, 1] after each token [N, 1] seen alone."""
    logits = nnx.merge(graphdef, params).logits(_one_token_rows(graphdef, params, tokens))
    return jnp.argmax(logits, -1).astype(jnp.int32)


def test_the_decoder_runs_the_registered_implementation(toy):
    tokens = _tokens()
    n, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), (n, length))
    segments = jnp.ones_like(tokens)

    def forward(impl):
        graphdef, params = nnx.split(build_model(CFG.replace(attention_impl=impl), "causal_lm", seed=1))
        hidden = jax.jit(lambda p: nnx.merge(graphdef, p).decoder(tokens, positions, segments))(params)
        return graphdef, params, np.asarray(hidden)

    graphdef, params, got = forward(TOY)
    assert CALLS["prepare"] >= 1 and CALLS["attend"] >= CFG.num_hidden_layers
    alone = np.asarray(_one_token_rows(graphdef, params, tokens))
    np.testing.assert_allclose(got, alone, atol=1e-5, rtol=1e-5)  # each token from itself alone: the toy ran
    _, _, reference = forward("einsum")  # same seed, same weights: the reference's tokens see their context
    assert np.max(np.abs(reference - alone)[:, 1:]) > 1e-2


def test_the_sampler_prefills_and_decodes_with_the_registered_implementation(toy):
    model = build_model(CFG.replace(attention_impl=TOY), "causal_lm", seed=2)
    graphdef, params = nnx.split(model)
    prompts = [[5, 6, 7, 8, 9], [3, 4], [20, 21, 22]]
    p, new = 6, 4
    tokens = np.zeros((len(prompts), p), np.int32)
    for r, prompt in enumerate(prompts):
        tokens[r, p - len(prompt) :] = prompt  # left-padded
    lengths = np.array([len(x) for x in prompts], np.int32)
    cfg = SamplingConfig(max_new_tokens=new, temperature=0.0)
    out = make_sampler(graphdef, cfg)(params, tokens, lengths, jnp.arange(3), jax.random.key(0))
    assert CALLS[f"cached {p} queries"] >= 1 and CALLS["cached 1 queries"] >= 1  # prefill and decode

    # With no context, each next token is the argmax of the logits of the previous token alone.
    prev, want = jnp.asarray(tokens[:, -1:]), []
    for _ in range(new):
        prev = _next_alone(graphdef, params, prev)
        want.append(np.asarray(prev[:, 0]))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.stack(want, 1))


def test_aot_compiles_and_reports_the_registered_implementation(toy):
    """The cheapest run aot accepts: the tiny reward model, 2 layers, short rows, on this host's CPU devices."""
    cfg = load_config(
        RMRunConfig,
        None,
        [
            f"runtime.attention_impl={TOY}",
            "data.batch_size=8",
            "data.max_length=32",
            "data.num_answers=2",
            "data.pad_to_multiple=32",
            "train.micro_batches=1",
        ],
    )
    report = aot.compile_report(cfg, "cpu", num_layers=2)
    assert report["attention_impl"] == TOY
    assert CALLS["prepare"] >= 1 and CALLS["attend"] >= 1  # the compiled train step ran the toy's layers


def test_an_entry_without_a_cached_path_uses_the_reference_and_says_so(caplog):
    entry = dataclasses.replace(A.get("blockwise"), name="toy_uncached")
    q, k, v = (jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, h, 8)), jnp.float32) for h in (4, 2, 2))
    mask = A.attention_mask(jnp.ones((2, 5), jnp.int32), jnp.broadcast_to(jnp.arange(5), (2, 5)), None)
    with A.registered(entry), caplog.at_level(logging.INFO, logger="starling_jax.model.attention.registry"):
        got = A.attend_cached(CFG.replace(attention_impl="toy_uncached"), q, [(k, v, mask)])
        A.attend_cached(CFG.replace(attention_impl="toy_uncached"), q, [(k, v, mask)])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(A.gqa_attention(q, [(k, v, mask)])))
    logged = [r.getMessage() for r in caplog.records if "toy_uncached" in r.getMessage()]
    assert logged == [
        "runtime.attention_impl=toy_uncached has no cached path: the sampler and selected rows use einsum's"
    ]
