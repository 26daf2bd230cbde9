"""The jitted generation core: prefill + a `lax.while_loop` decode over a preallocated KV cache.

`sample(model, prompt_tokens, prompt_lengths, row_ids, key, cfg)` is a pure function of the model (an NNX
`CausalLM`, merged from its params pytree at trace time only) and arrays; `make_sampler` wraps it in one
`jax.jit` over the params pytree (graphdef static), so a whole rollout is one compiled program with no host round
trip and no NNX graph traversal per token. A jitted RL loop can call `sample_from_params(graphdef, params, ...)`
inside its own program with the actor's params.

Inputs (one batch, N rows)
  prompt_tokens   int32 [N, P]   LEFT-padded prompts (pad ids on the left, then the prompt)
  prompt_lengths  int32 [N]      real prompt tokens per row (≥ 1)
  row_ids         int32 [N]      stable ids (e.g. the dataset index): each row's sampling key is folded from it,
                                 so a row's completion does not depend on its batch mates or the batch size
  key             a jax.random key (the seed)
Left padding puts every row's next token at the same cache index, so one `dynamic_update_slice` per step writes
all rows; positions are explicit (`index - (P - length)`), so RoPE sees 0..n-1 for every row as without padding.

KV-cache layout on the mesh
  k, v: [num_layers, N, G, S, Dh] with S = P + max_new_tokens - 1 (every token but the last sampled one is fed
  back), dtype = the model's compute dtype; one [N, G, S, Dh] buffer per layer unless layers are scanned (then
  one stacked array, which the layer scan slices). N (batch) is sharded over the data-parallel axes (`data`, `fsdp`:
  logical axis `act_batch`), G (KV heads) over `tensor` (`act_kv_heads`, replicated when `tensor` does not divide
  G); layers, positions and head dim are whole. Heads before positions: a decode step's single query reads
  each [S, Dh] slab in place (the reference's `attention.gqa_attention`), with no per-step transpose of the
  cache. GQA: the cache holds the G KV heads only; the H = G·R query heads read them through a [G, R] reshape
  of the queries, never a repeated copy.
  Per-layer buffers: each layer writes the new token's k/v into its buffer first and then attends over the
  buffer alone (`Decoder.decode`); nothing reads the old buffer afterwards, so XLA updates it in place and the
  cache is never concatenated or copied. Scanned layers: the new k/v are attended as a second block next to the
  stacked cache and written for all layers after the step (behind an optimization barrier, for the same reason).

Attention: prefill and decode attend through the cached path of the registry entry `runtime.attention_impl` names
(`attention.attend_cached`, the reference's for entries without one), over key blocks with the boolean masks built
here: the rule's mask over the left-padded prompt (`attention.attention_mask`), then the cache's visibility below.

Sliding window (Mistral): masking, not a rolling buffer. A cached key j is visible to the query at cache index i
iff it is a real token (j ≥ P - length), j < i, and i - j < W (HF's rule, which with left padding equals the
position difference). Why masking: it gives exactly transformers' tokens for rows longer than W with one cache
layout and static shapes; a rolling buffer saves memory only when P + max_new_tokens > W, which Starling's
rollouts (≤ 2048 tokens vs Mistral's 4096 window) never reach, and would need a modular index and a second
position bookkeeping. The cost of masking for longer rows is reading S instead of W keys per step.

Outputs (`SampleOutput`, all [N, ...] and sharded like the batch)
  tokens             int32 [N, T]    completion tokens (T = max_new_tokens); pad_token_id after a row's end
  lengths            int32 [N]       tokens generated, including the EOS / stop-sequence tokens that ended it
  finish_reason      int32 [N]       FINISH_LENGTH (0), FINISH_EOS (1) or FINISH_STOP (2); see FINISH_REASONS
  logprobs           float32 [N, T]  log-prob of each token under the raw model (temperature 1, no top-k/p),
                                     0 after the end
  sampling_logprobs  float32 [N, T]  log-prob under the distribution actually sampled from (0 for greedy)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from starling_jax.errors import ConfigError
from starling_jax.model import attention
from starling_jax.model.attention import attention_mask
from starling_jax.parallel import sharding
from starling_jax.parallel.sharding import constrain
from starling_jax.sample import logits as logits_lib

FINISH_LENGTH, FINISH_EOS, FINISH_STOP = 0, 1, 2
FINISH_REASONS = ("length", "eos", "stop")
# XLA:CPU only: no YNNPACK library fusions. A decode step is ~30 small dots ([16, ≤768] rows) plus the LM head.
# Measured side by side in one process on bench/rollout.py's model (same tokens): with XLA's own dot emitter the
# loop is 2-3% faster on an idle 2-core machine and ~25% faster when other processes share the cores (as the
# tf.data threads of an RL job do). Other backends get no options.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
CACHE_AXES = (None, "act_batch", "act_kv_heads", None, None)  # [layers, N, G, S, Dh]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings; static (hashable): one compiled program per (settings, batch shape)."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0  # 1 → off
    eos_token_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token-level stop strings (a row ends when it ends with one)
    pad_token_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}: must be ≥ 1")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature}: must be ≥ 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k}: must be ≥ 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: must be in (0, 1]")
        if any(len(s) == 0 for s in self.stop_sequences):
            raise ConfigError("stop_sequences: an empty stop sequence would end every row at once")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        object.__setattr__(self, "stop_sequences", tuple(tuple(int(t) for t in s) for s in self.stop_sequences))


class SampleOutput(NamedTuple):
    tokens: jax.Array
    lengths: jax.Array
    finish_reason: jax.Array
    logprobs: jax.Array
    sampling_logprobs: jax.Array


def _stop_table(stop_sequences):
    """Stop sequences right-aligned in an int32 [S, M] table, -1 on the left = matches anything."""
    width = max(len(s) for s in stop_sequences)
    return jnp.array([[-1] * (width - len(s)) + list(s) for s in stop_sequences], jnp.int32)


def _ends_with_stop(window, table):
    """window [N, M]: each row's last M tokens (-2 before the first) → bool [N]: it ends with a stop sequence."""
    match = (window[:, None, :] == table[None]) | (table[None] == -1)
    return jnp.any(jnp.all(match, axis=-1), axis=-1)


def _prefill_mask(mcfg, real, positions):
    """What the prefill's attention reads: with `attention_impl` blockwise or splash (`auto` off CPU) the segment
    ids and positions of the left-padded prompts (no [N, H, P, P] scores); else the einsum mask. fused / cudnn take
    right-padded rows only, so they get the mask here too."""
    seg = real.astype(jnp.int32)
    if attention.resolve(mcfg.attention_impl) in ("blockwise", "splash"):
        return seg, positions
    return attention_mask(seg, positions, mcfg.sliding_window)


def sample(model, prompt_tokens, prompt_lengths, row_ids, key, cfg: SamplingConfig) -> SampleOutput:
    """Generates up to `cfg.max_new_tokens` tokens for every row (see the module doc for shapes and layout)."""
    mcfg = model.cfg
    n, p = prompt_tokens.shape
    t_max = cfg.max_new_tokens
    s = p + t_max - 1
    window = mcfg.sliding_window
    prompt_lengths = prompt_lengths.astype(jnp.int32)
    start = p - prompt_lengths  # cache index of each row's first real token
    row_ids = row_ids.astype(jnp.int32)

    # ---- prefill: the prompts, keys/values stored at cache indices 0..P-1
    idx = jnp.arange(p)
    real = idx[None, :] >= start[:, None]
    positions = jnp.where(real, idx[None, :] - start[:, None], 0).astype(jnp.int32)
    hidden, k, v = model.decoder.cached(prompt_tokens, positions, None, _prefill_mask(mcfg, real, positions))
    last_logits = model.logits(hidden[:, -1:])[:, 0]
    pad = ((0, 0), (0, 0), (0, 0), (0, s - p), (0, 0))
    heads_first = lambda x: x.transpose(0, 1, 3, 2, 4)  # [layers, N, L, G, Dh] → [layers, N, G, L, Dh]
    cache_k = constrain(jnp.pad(heads_first(k), pad), CACHE_AXES)
    cache_v = constrain(jnp.pad(heads_first(v), pad), CACHE_AXES)
    if not mcfg.scan_layers:  # one buffer per layer: each decode step reads and updates them in place
        cache_k, cache_v = tuple(cache_k), tuple(cache_v)

    eos_ids = jnp.array(cfg.eos_token_ids or (-1,), jnp.int32)
    stop_table = _stop_table(cfg.stop_sequences) if cfg.stop_sequences else None
    stop_width = stop_table.shape[1] if stop_table is not None else 1

    def record(step, logits, state):
        """Choose token `step` from `logits` for the unfinished rows and update outputs / finish state."""
        tokens, lengths, finish, done, logprobs, sampling_lps, recent = state
        tok, raw_lp, samp_lp = logits_lib.choose(logits, key, row_ids, step, cfg.temperature, cfg.top_k, cfg.top_p)
        tok = jnp.where(done, cfg.pad_token_id, tok)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, step))
        logprobs = jax.lax.dynamic_update_slice(logprobs, jnp.where(done, 0.0, raw_lp)[:, None], (0, step))
        sampling_lps = jax.lax.dynamic_update_slice(sampling_lps, jnp.where(done, 0.0, samp_lp)[:, None], (0, step))
        lengths = lengths + (~done).astype(jnp.int32)
        recent = jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)
        is_eos = jnp.any(tok[:, None] == eos_ids[None, :], axis=-1) & ~done
        is_stop = (_ends_with_stop(recent, stop_table) & ~done) if stop_table is not None else jnp.zeros_like(done)
        finish = jnp.where(is_eos, FINISH_EOS, jnp.where(is_stop, FINISH_STOP, finish))
        return tok, (tokens, lengths, finish, done | is_eos | is_stop, logprobs, sampling_lps, recent)

    batch = lambda x: constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))
    state = (
        batch(jnp.full((n, t_max), cfg.pad_token_id, jnp.int32)),
        jnp.zeros((n,), jnp.int32),
        jnp.full((n,), FINISH_LENGTH, jnp.int32),
        jnp.zeros((n,), bool),
        batch(jnp.zeros((n, t_max), jnp.float32)),
        batch(jnp.zeros((n, t_max), jnp.float32)),
        jnp.full((n, stop_width), -2, jnp.int32),
    )
    tok, state = record(0, last_logits, state)

    # ---- decode: feed token step-1 at cache index P+step-1, choose token `step`
    cache_idx = jnp.arange(s)

    def cond(carry):
        step, _, _, _, state = carry
        return (step < t_max) & ~jnp.all(state[3])

    def body(carry):
        step, tok, cache_k, cache_v, state = carry
        i = p + step - 1
        positions = (prompt_lengths + step - 1)[:, None]
        # Cached keys the new token sees: real ones up to index i (per-layer buffers, written before they are
        # read) or i - 1 (scanned layers: the new key is a second block), within the window.
        last = i if not mcfg.scan_layers else i - 1
        visible = (cache_idx[None, :] >= start[:, None]) & (cache_idx[None, :] <= last)
        if window is not None:
            visible &= (i - cache_idx[None, :]) < window
        if not mcfg.scan_layers:
            # Per-layer buffers: each layer writes its new key/value at index i, then attends over its cache.
            hidden, cache_k, cache_v = model.decoder.decode(
                tok[:, None], positions, cache_k, cache_v, visible[:, None, None, None, :], i
            )
            cache_k = tuple(constrain(c, CACHE_AXES[1:]) for c in cache_k)
            cache_v = tuple(constrain(c, CACHE_AXES[1:]) for c in cache_v)
            tok, state = record(step, model.logits(hidden)[:, 0], state)
            return step + 1, tok, cache_k, cache_v, state
        # Scanned layers (one stacked buffer): the new keys/values are attended as a second block and written
        # for all layers at once after the step.
        hidden, k, v = model.decoder.cached(
            tok[:, None],
            positions,
            (cache_k, cache_v, visible[:, None, None, None, :]),
            jnp.ones((n, 1, 1, 1, 1), bool),
        )
        logits = model.logits(hidden)[:, 0]
        # Write the new keys/values only after every layer has read the cache: the barrier makes the writes
        # depend on the logits, so XLA updates the cache buffers in place instead of copying them each step.
        k, v, logits = jax.lax.optimization_barrier((k, v, logits))
        write = lambda cache, new: constrain(
            jax.lax.dynamic_update_slice(cache, heads_first(new).astype(cache.dtype), (0, 0, 0, i, 0)), CACHE_AXES
        )
        cache_k, cache_v = write(cache_k, k), write(cache_v, v)
        tok, state = record(step, logits, state)
        return step + 1, tok, cache_k, cache_v, state

    if t_max > 1:
        _, _, _, _, state = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, cache_k, cache_v, state))
    tokens, lengths, finish, _, logprobs, sampling_lps, _ = state
    return SampleOutput(tokens, lengths, finish, logprobs, sampling_lps)


def rollout_arrays(prompt_tokens, prompt_lengths, out: SampleOutput) -> dict[str, jax.Array]:
    """Prompt + completion in the rollout layout of `rl/experience.py`: tokens [N, P + T] (the left-padded prompt,
    then the completion padded after its end), positions 0..n-1 over each row's real tokens, segment_ids 1 on
    real tokens, and response_mask [N, T] (True on generated tokens). A full forward on it gives the sampler's
    `logprobs` at indices P - 1 + j."""
    p = prompt_tokens.shape[1]
    t = out.tokens.shape[1]
    idx = jnp.arange(p + t)[None, :]
    start = (p - prompt_lengths)[:, None]
    response_mask = jnp.arange(t)[None, :] < out.lengths[:, None]
    real = (idx >= start) & ((idx < p) | jnp.pad(response_mask, ((0, 0), (p, 0))))
    return {
        "tokens": jnp.concatenate([prompt_tokens, out.tokens], axis=1).astype(jnp.int32),
        "positions": jnp.where(real, idx - start, 0).astype(jnp.int32),
        "segment_ids": real.astype(jnp.int32),
        "response_mask": response_mask,
    }


def sample_from_params(
    graphdef: nnx.GraphDef, params: nnx.State, prompt_tokens, prompt_lengths, row_ids, key, cfg: SamplingConfig
) -> SampleOutput:
    """`sample` as a pure function of the params pytree, for use inside a caller's own jitted program."""
    return sample(nnx.merge(graphdef, params), prompt_tokens, prompt_lengths, row_ids, key, cfg)


@functools.lru_cache(maxsize=32)
def make_sampler(graphdef: nnx.GraphDef, cfg: SamplingConfig, mesh: Mesh | None = None):
    """One jitted `(params, prompt_tokens, prompt_lengths, row_ids, key) -> SampleOutput`; with a mesh, the batch
    arrays are sharded over its data-parallel axes (N must be divisible by data × fsdp) and activations and the
    KV cache are pinned to the layout above. It compiles once per distinct (N, P); the jitted function is cached
    per (graphdef, settings, mesh), so samplers built again for the same model reuse its compiled programs."""

    def run(params, prompt_tokens, prompt_lengths, row_ids, key):
        with sharding.activation_sharding(mesh):
            return sample_from_params(graphdef, params, prompt_tokens, prompt_lengths, row_ids, key, cfg)

    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    options = CPU_COMPILER_OPTIONS if platform == "cpu" else None
    if mesh is None:
        return jax.jit(run, compiler_options=options)
    rows = sharding.batch_sharding(mesh, 1)
    table = sharding.batch_sharding(mesh, 2)
    out = SampleOutput(table, rows, rows, table, table)
    return jax.jit(
        run,
        in_shardings=(None, table, rows, rows, sharding.replicated(mesh)),
        out_shardings=out,
        compiler_options=options,
    )
