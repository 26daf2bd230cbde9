"""starling_jax vs transformers' PyTorch Mistral/Llama on random tiny configs (float32, right-padded batches)."""

import numpy as np
import pytest

from .hf_fixtures import require_torch  # noqa: E402

require_torch()

from starling_jax.model.create import abstract_model  # noqa: E402
from starling_jax.model.hf_io import load_hf  # noqa: E402

from .hf_fixtures import cached_model, forward, hf_outputs, one_device_mesh, random_batch  # noqa: E402

LENGTH = 12  # > the sliding window (5), so the window is binding
TOL = 1e-4

CAUSAL_CASES = {
    # name: (kind, HF config kwargs, runtime overrides)
    "mistral_gqa_window_list": ("mistral", dict(gqa=True, sliding_window=5), dict(scan_layers=False)),
    "mistral_gqa_window_scan_remat": (
        "mistral",
        dict(gqa=True, sliding_window=5),
        dict(scan_layers=True, remat_policy="full"),
    ),
    "llama2_tied_list_remat": ("llama", dict(gqa=False, tied=True), dict(scan_layers=False, remat_policy="dots")),
    "llama2_untied_scan": ("llama", dict(gqa=False, tied=False), dict(scan_layers=True)),
    # jax.nn.dot_product_attention (XLA on CPU; cuDNN on GPU in bf16): causal + window + lengths, GQA
    "mistral_gqa_window_fused": ("mistral", dict(gqa=True, sliding_window=5), dict(attention_impl="fused")),
    "llama2_fused_scan_remat": (
        "llama",
        dict(gqa=False, tied=False),
        dict(attention_impl="fused", scan_layers=True, remat_policy="full"),
    ),
}


@pytest.mark.parametrize("case", sorted(CAUSAL_CASES))
def test_causal_lm_logits_match_transformers(case, tmp_path_factory):
    kind, hf_kwargs, runtime = CAUSAL_CASES[case]
    folder = cached_model(tmp_path_factory, kind, "lm", **hf_kwargs)
    tokens, positions, segment_ids, lengths = random_batch(length=LENGTH)
    ref = hf_outputs(folder, tokens, lengths, "lm")
    cfg, graphdef, state = load_hf(folder, "causal_lm", one_device_mesh(), **runtime)
    ours = forward(cfg, graphdef, state, tokens, positions, segment_ids)
    real = segment_ids.astype(bool)
    assert ours.shape == ref.shape
    assert np.abs(ref[real]).max() > 1.0  # logits are not trivially small
    np.testing.assert_array_less(np.abs(ours - ref)[real].max(), TOL)


SEQ_CLS_CASES = {
    "mistral_gqa_window_list": ("mistral", dict(gqa=True, sliding_window=5), dict(scan_layers=False)),
    "llama2_scan_remat": ("llama", dict(gqa=False), dict(scan_layers=True, remat_policy="full")),
    "mistral_gqa_window_fused": ("mistral", dict(gqa=True, sliding_window=5), dict(attention_impl="fused")),
}


@pytest.mark.parametrize("case", sorted(SEQ_CLS_CASES))
def test_sequence_classification_scores_match_transformers(case, tmp_path_factory):
    kind, hf_kwargs, runtime = SEQ_CLS_CASES[case]
    folder = cached_model(tmp_path_factory, kind, "score", **hf_kwargs)
    # Real tokens are drawn from 1..V-1 and padding is 0 = pad_token_id, so HF's "rightmost non-pad token" is
    # exactly the last real token, which we pass explicitly as reward_index.
    tokens, positions, segment_ids, lengths = random_batch(seed=1, length=LENGTH)
    ref = hf_outputs(folder, tokens, lengths, "score")
    cfg, graphdef, state = load_hf(folder, "reward", one_device_mesh(), **runtime)
    ours = forward(
        cfg, graphdef, state, tokens, positions, segment_ids, role="reward", reward_index=(lengths - 1).astype(np.int32)
    )
    assert ours.shape == (len(lengths),)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_sliding_window_boundary_matches_hf(tmp_path_factory):
    """HF Mistral allows key j for query i iff i - j < W (masking_utils: kv_idx > q_idx - W). A window one wider
    (or none) changes the logits of late tokens, so the parity above pins the exact boundary."""
    folder = cached_model(tmp_path_factory, "mistral", "lm", gqa=True, sliding_window=5)
    tokens, positions, segment_ids, lengths = random_batch(length=LENGTH)
    ref = hf_outputs(folder, tokens, lengths, "lm")
    cfg, _, state = load_hf(folder, "causal_lm", one_device_mesh())
    real = segment_ids.astype(bool)
    assert cfg.sliding_window == 5
    for window in (6, 4, None):
        other = cfg.replace(sliding_window=window)
        graphdef, _ = abstract_model(other, "causal_lm")
        ours = forward(other, graphdef, state, tokens, positions, segment_ids)
        assert np.abs(ours - ref)[real].max() > 100 * TOL, window
        # tokens inside the first window are unaffected by its width
        np.testing.assert_array_less(np.abs(ours - ref)[:, :4].max(), TOL)


def test_bfloat16_compute_close_to_float32(tmp_path_factory):
    """bf16 activations with fp32 master weights: max |logit diff| ≤ 3% of the largest |logit| (measured ~1%)."""
    folder = cached_model(tmp_path_factory, "mistral", "lm", gqa=True, sliding_window=5)
    tokens, positions, segment_ids, lengths = random_batch(length=LENGTH)
    real = segment_ids.astype(bool)
    mesh = one_device_mesh()
    cfg32, g32, s32 = load_hf(folder, "causal_lm", mesh)
    cfg16, g16, s16 = load_hf(folder, "causal_lm", mesh, dtype="bfloat16", param_dtype="float32")
    ref = forward(cfg32, g32, s32, tokens, positions, segment_ids)
    ours = forward(cfg16, g16, s16, tokens, positions, segment_ids)
    scale = np.abs(ref[real]).max()
    assert np.abs(ours - ref)[real].max() <= 3e-2 * scale
    assert (ours.argmax(-1) == ref.argmax(-1))[real].mean() >= 0.9
