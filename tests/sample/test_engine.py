"""The jitted KV-cache sampler against references nobody here wrote: step-by-step argmax of full forwards without a
cache, transformers' greedy `generate` on the same HF folder, full-forward log-probs, and one device vs 8."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from starling_jax.model import hf_io  # noqa: E402
from starling_jax.parallel.sharding import MeshConfig, make_mesh  # noqa: E402
from starling_jax.sample.engine import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    SamplingConfig,  # noqa: E402
    make_sampler,
    rollout_arrays,
)
from starling_jax.sample.rollout import Sampler, bucket_length  # noqa: E402
from tests.model.hf_fixtures import cached_model, one_device_mesh  # noqa: E402

# Three prompts of different lengths; Mistral's window (5) is shorter than prompt + completion (up to 7 + 8).
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 12], [20, 21, 22, 23, 24]]
NEW = 8
EOS = 2
MISTRAL = dict(kind="mistral", gqa=True, sliding_window=5)
# A sampled config shared by most tests (one compiled program per batch shape: compiles dominate test time).
SAMPLED = SamplingConfig(max_new_tokens=NEW, temperature=0.8, top_k=40, top_p=0.9)
GREEDY = SamplingConfig(max_new_tokens=NEW, temperature=0.0, eos_token_ids=(EOS,))


def left_pad(prompts, length=8, pad=0):
    tokens = np.full((len(prompts), length), pad, np.int32)
    for r, p in enumerate(prompts):
        tokens[r, length - len(p) :] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


def tied_llama(tmp_path_factory):
    """Llama (no GQA) with tied embeddings, embeddings scaled by 0.2: at the fixture's N(0, 1) scale the tied head
    just repeats the last token (the residual stream is its own embedding), which would make parity trivial."""
    from safetensors.numpy import load_file, save_file

    src = cached_model(tmp_path_factory, "llama", "lm", gqa=False, tied=True)
    folder = tmp_path_factory.mktemp("tied_llama")
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = {k: v * 0.2 if "embed_tokens" in k else v for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def load(folder, **runtime):
    cfg, graphdef, params = hf_io.load_hf(folder, "causal_lm", one_device_mesh(), **runtime)
    return folder, cfg, graphdef, params


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return load(cached_model(tmp_path_factory, "mistral", "lm", gqa=True, sliding_window=5))


@pytest.fixture(scope="module", params=["mistral_gqa_window", "llama_tied"])
def model(request, tmp_path_factory, mistral):
    return mistral if request.param == "mistral_gqa_window" else load(tied_llama(tmp_path_factory))


def run(graphdef, params, cfg: SamplingConfig, prompts=PROMPTS, row_ids=None, seed=0, length=8, mesh=None):
    tokens, lengths = left_pad(prompts, length)
    row_ids = jnp.arange(len(prompts)) if row_ids is None else jnp.asarray(row_ids)
    out = make_sampler(graphdef, cfg, mesh)(params, tokens, lengths, row_ids, jax.random.key(seed))
    return jax.tree.map(np.asarray, out)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens, positions, segment_ids):
    return nnx.merge(graphdef, params)(tokens, positions, segment_ids)


def forward(cfg, graphdef, params, tokens, positions, segment_ids):
    """Full forward without a cache (one compiled program per model and shape) → numpy logits."""
    return np.asarray(_logits(graphdef, params, tokens, positions, segment_ids))


def full_forward(cfg, graphdef, params, sequences):
    """Logits of full sequences right-padded to 16 tokens (one compiled shape), no cache."""
    length = 16
    tokens = np.zeros((len(sequences), length), np.int32)
    seg = np.zeros_like(tokens)
    for r, s in enumerate(sequences):
        tokens[r, : len(s)] = s
        seg[r, : len(s)] = 1
    positions = np.where(seg > 0, np.arange(length)[None], 0).astype(np.int32)
    return forward(cfg, graphdef, params, tokens, positions, seg)


def hf_greedy(folder, prompts, new):
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens, lengths = left_pad(prompts)
    mask = (np.arange(tokens.shape[1])[None] >= tokens.shape[1] - lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=0,
        )
    return out[:, tokens.shape[1] :].numpy()


def test_greedy_equals_stepwise_argmax_transformers_and_full_forward_logprobs(model):
    folder, cfg, graphdef, params = model
    out = run(graphdef, params, GREEDY)
    assert len(set(out.tokens.ravel())) > 4  # not a degenerate repetition
    # step-by-step argmax of full forwards, no cache (rows that emit EOS stop, as in generate)
    seqs, alive = [list(p) for p in PROMPTS], [True] * len(PROMPTS)
    for _ in range(NEW):
        logits = full_forward(cfg, graphdef, params, seqs)
        for r, s in enumerate(seqs):
            token = int(logits[r, len(s) - 1].argmax()) if alive[r] else 0
            alive[r] = alive[r] and token != EOS
            s.append(token)
    expected = np.array([s[len(p) :] for s, p in zip(seqs, PROMPTS)])
    np.testing.assert_array_equal(out.tokens, expected)
    np.testing.assert_array_equal(out.tokens, hf_greedy(folder, PROMPTS, NEW))
    # log-probs of the generated tokens = those of one full forward on the finished sequences
    finished = [list(p) + list(out.tokens[r, : out.lengths[r]]) for r, p in enumerate(PROMPTS)]
    logp = jax.nn.log_softmax(full_forward(cfg, graphdef, params, finished), axis=-1)
    for r, p in enumerate(PROMPTS):
        n = out.lengths[r]
        ref = [logp[r, len(p) - 1 + i, out.tokens[r, i]] for i in range(n)]
        np.testing.assert_allclose(out.logprobs[r, :n], ref, atol=1e-4)
        assert not out.logprobs[r, n:].any()


def test_scanned_layers_give_the_same_rollout(mistral):
    folder, cfg, graphdef, params = mistral
    _, _, graphdef_s, params_s = load(folder, scan_layers=True)
    a, b = run(graphdef, params, SAMPLED), run(graphdef_s, params_s, SAMPLED)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_blockwise_prefill_gives_the_same_rollout(mistral, scan, monkeypatch):
    """`attention_impl=blockwise` (what RL's `runtime.attention_impl: auto` is on GPU; splash on TPU takes the same
    path): the prefill reads the left-padded prompts' segment ids and positions instead of an [N, H, P, P] mask,
    with the same rollout (Mistral's window 5 is shorter than the 7-token prompt)."""
    folder = mistral[0]
    _, _, graphdef_e, params_e = load(folder, scan_layers=scan)
    _, cfg_b, graphdef_b, params_b = load(folder, scan_layers=scan, attention_impl="blockwise")
    assert cfg_b.attention_impl == "blockwise"
    from starling_jax.model.attention import blockwise as attention_blockwise

    traced = []
    blockwise = attention_blockwise.blockwise_attention
    monkeypatch.setattr(
        attention_blockwise, "blockwise_attention", lambda *a, **k: traced.append(a[0].shape) or blockwise(*a, **k)
    )
    a, b = run(graphdef_e, params_e, SAMPLED), run(graphdef_b, params_b, SAMPLED)
    assert traced and all(shape[1] == 8 for shape in traced)  # the prefill (8 prompt tokens) took blockwise
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_sampling_logprobs_match_warped_full_forward(mistral):
    from tests.sample.test_logits import reference_warp

    _, cfg, graphdef, params = mistral
    t, k, p = SAMPLED.temperature, SAMPLED.top_k, SAMPLED.top_p
    out = run(graphdef, params, SAMPLED, seed=3)
    finished = [list(q) + list(out.tokens[r]) for r, q in enumerate(PROMPTS)]
    logits = full_forward(cfg, graphdef, params, finished)
    for r, q in enumerate(PROMPTS):
        rows = logits[r, len(q) - 1 : len(q) - 1 + NEW]
        warped = reference_warp(rows, t, k, p)
        chosen = warped[np.arange(NEW), out.tokens[r]]
        assert (chosen > 0).all(), "a token outside the top-k / nucleus was sampled"
        np.testing.assert_allclose(out.sampling_logprobs[r], np.log(chosen), atol=1e-4)
    # the rollout layout PPO trains on (left-padded prompt + completion): a full forward gives the same log-probs
    tokens, lengths = left_pad(PROMPTS)
    arrays = jax.tree.map(
        np.asarray, rollout_arrays(jnp.asarray(tokens), jnp.asarray(lengths), jax.tree.map(jnp.asarray, out))
    )
    logp = jax.nn.log_softmax(
        forward(cfg, graphdef, params, arrays["tokens"], arrays["positions"], arrays["segment_ids"]), axis=-1
    )
    chosen = np.take_along_axis(np.asarray(logp[:, 7:-1]), out.tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(chosen, out.logprobs, atol=1e-4)
    assert arrays["response_mask"].all() and (arrays["positions"][1, 5:] == np.arange(11)).all()


def test_eos_and_stop_sequences_end_rows_individually(mistral):
    _, cfg, graphdef, params = mistral
    free = run(graphdef, params, SAMPLED, seed=1)
    assert (free.lengths == NEW).all() and (free.finish_reason == FINISH_LENGTH).all()
    eos = int(free.tokens[0, 2])  # row 0 emits it at step 2 (or earlier)
    stop = tuple(int(x) for x in free.tokens[1, 3:5])  # row 1 ends with it after step 4 (or earlier)
    sc = SamplingConfig(
        max_new_tokens=NEW,
        temperature=SAMPLED.temperature,
        top_k=SAMPLED.top_k,
        top_p=SAMPLED.top_p,
        eos_token_ids=(eos, 99999),
        stop_sequences=(stop,),
    )
    out = run(graphdef, params, sc, seed=1)

    def first_end(tokens):
        for i in range(NEW):
            if tokens[i] == eos:
                return i + 1, FINISH_EOS
            if i >= len(stop) - 1 and tuple(tokens[i - len(stop) + 1 : i + 1]) == stop:
                return i + 1, FINISH_STOP
        return NEW, FINISH_LENGTH

    for r in range(len(PROMPTS)):
        n, reason = first_end(list(free.tokens[r]))
        assert (out.lengths[r], out.finish_reason[r]) == (n, reason), r
        np.testing.assert_array_equal(out.tokens[r, :n], free.tokens[r, :n])  # same draws up to the end
        assert (out.tokens[r, n:] == 0).all() and not out.logprobs[r, n:].any()  # finished rows stop changing
    assert out.finish_reason[0] == FINISH_EOS and out.lengths[0] <= 3
    assert out.finish_reason[1] in (FINISH_EOS, FINISH_STOP) and out.lengths[1] <= 5


def test_seeded_and_independent_of_batch_mates_and_batch_size(mistral):
    _, cfg, graphdef, params = mistral
    sc = SAMPLED
    a = run(graphdef, params, sc, seed=7)
    np.testing.assert_array_equal(a.tokens, run(graphdef, params, sc, seed=7).tokens)
    assert not np.array_equal(a.tokens, run(graphdef, params, sc, seed=8).tokens)
    # rows 1 and 2 among other prompts in a bigger batch, at other places (keeping their row ids)
    mates = run(graphdef, params, sc, [[9, 9, 9], PROMPTS[2], [30, 31], PROMPTS[1]], row_ids=[11, 2, 12, 1], seed=7)
    np.testing.assert_array_equal(mates.tokens[[3, 1]], a.tokens[1:])
    # the host driver with a batch size of 4 (rows sorted by length, a dummy row added): same completions
    via_driver = Sampler(graphdef, params, cfg, batch_size=4, min_bucket=8).generate(PROMPTS, sc, seed=7)
    assert [c.tokens for c in via_driver] == [list(t) for t in a.tokens]
    np.testing.assert_allclose([c.logprobs for c in via_driver], a.logprobs, atol=1e-6)


def test_max_new_tokens_one_and_buckets(mistral):
    _, cfg, graphdef, params = mistral
    out = run(graphdef, params, SamplingConfig(max_new_tokens=1, temperature=0.0))
    assert out.tokens.shape == (3, 1) and (out.lengths == 1).all()
    assert [bucket_length(n, 16) for n in (1, 16, 17, 100, 129)] == [16, 16, 32, 128, 256]
    assert bucket_length(300, 16, maximum=257) == 257


def test_eight_devices_equal_one(mistral):
    """data=2 × fsdp=2 × tensor=2: the batch over 4 data-parallel shards, the 2 KV heads of the cache over tensor."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    folder, cfg, graphdef, params = mistral
    mesh8 = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    _, graphdef8, params8 = hf_io.load_hf(folder, "causal_lm", mesh8)
    prompts, ids = [[9, 9, 9], PROMPTS[2], [30, 31], PROMPTS[1]], [11, 2, 12, 1]
    one = run(graphdef, params, SAMPLED, prompts, row_ids=ids)
    tokens, lengths = left_pad(prompts)
    out = make_sampler(graphdef8, SAMPLED, mesh8)(params8, tokens, lengths, jnp.asarray(ids), jax.random.key(0))
    assert len(out.tokens.sharding.device_set) == 8
    out = jax.tree.map(np.asarray, out)
    np.testing.assert_array_equal(out.tokens, one.tokens)
    np.testing.assert_allclose(out.logprobs, one.logprobs, atol=1e-5)
    np.testing.assert_array_equal(out.lengths, one.lengths)
