"""`python -m starling_jax.aot` for real TPU topologies, compiled on this CPU host with libtpu (the `tpu` extra).

Skipped where libtpu is not installed; `.ci/run` runs this file in a layered environment that adds it. A reduced
TPU-shaped reward model (hidden 512 = 4 × 128 lanes, so every per-chip shard is tile-aligned) on a v5e-4 slice
and on two v5e-4 slices joined over DCN:
- start-up prints none of libtpu's metadata errors;
- the per-chip train state the compiler reports equals an analytic count of parameters and AdamW state;
- two slices keep that state per chip (parameters replicated across slices, sharded within) on a (dcn, ...) mesh.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="needs libtpu (the tpu extra); .ci/run's AOT step provides it")

D, F, V, LAYERS, HEADS, KV, HEAD_DIM = 512, 1024, 32000, 2, 4, 4, 128
FSDP = 4  # a v5e-4 slice: 4 chips, mesh fsdp=-1
CONFIG = [f"model.hidden_size={D}", f"model.intermediate_size={F}", f"model.vocab_size={V}",
          f"model.num_hidden_layers={LAYERS}", f"model.num_attention_heads={HEADS}",
          f"model.num_key_value_heads={KV}", "model.scan_layers=true", "model.remat_policy=full",
          "data.batch_size=8", "data.num_answers=2", "data.max_length=128", "data.pad_to_multiple=128"]
LIBTPU_START_UP_ERRORS = ("could not determine TPU accelerator type", "TPU_WORKER_HOSTNAMES", "INVALID_ARGUMENT",
                          "Failed to find host bounds")


def start_aot(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "starling_jax.aot", *CONFIG, "--json", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen) -> tuple[int, dict, str]:
    stdout, stderr = proc.communicate(timeout=900)
    assert stdout.strip(), stderr[-3000:]
    return proc.returncode, json.loads(stdout.strip().splitlines()[-1]), stderr


@pytest.fixture(scope="module")
def compiled():
    """Both compiles at once (each is mostly one single-threaded XLA TPU compile)."""
    one, two = start_aot("--topology", "v5e-4"), start_aot("--topology", "v5e-4", "--num-slices", "2")
    return {"one": result(one), "two": result(two)}


@pytest.fixture(scope="module")
def one_slice(compiled):
    return compiled["one"]


@pytest.fixture(scope="module")
def two_slices(compiled):
    return compiled["two"]


def analytic_state_bytes_per_chip() -> int:
    """fp32 parameters + AdamW's two fp32 moments: matrices split FSDP ways over the chips of a slice, the RMSNorm
    weights (2 per layer + the final one) replicated; step counters and the RNG key are a few bytes."""
    matrices = V * D + LAYERS * (D * HEAD_DIM * (2 * HEADS + 2 * KV) + 3 * D * F) + D  # + the score head [D, 1]
    norms = LAYERS * 2 * D + D
    return 3 * 4 * (matrices // FSDP + norms)


def test_no_libtpu_start_up_errors(one_slice, two_slices):
    for rc, summary, stderr in (one_slice, two_slices):
        assert rc == 0 and summary["status"] == "completed", stderr[-3000:]
        for message in LIBTPU_START_UP_ERRORS:
            assert message not in stderr, stderr[-3000:]


def test_per_chip_state_matches_the_analytic_count(one_slice):
    _, s, _ = one_slice
    assert s["device_kind"] == "TPU v5 lite" and s["num_chips"] == 4 and s["fits"] is True
    assert s["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    params = V * D + LAYERS * (D * HEAD_DIM * (2 * HEADS + 2 * KV) + 3 * D * F + 2 * D) + D + D
    assert s["num_params"] == params
    expected = analytic_state_bytes_per_chip()
    m = s["memory_bytes"]
    # the donated state is what the new state aliases; the arguments add only the batch shard
    batch_bytes = (3 * 4 * 8 * 2 * 128 + 4 * 3 * 8 * 2) // 4  # tokens/positions/segments + per-answer arrays
    assert abs(m["alias"] - expected) <= 0.01 * expected, (m, expected)
    assert expected <= m["argument"] <= 1.01 * expected + 2 * batch_bytes, (m, expected)
    assert m["temp"] > 0 and s["per_chip_bytes"] >= m["argument"]


def test_two_v5e_slices_compile_on_a_dcn_mesh(one_slice, two_slices):
    _, one, _ = one_slice
    _, two, stderr = two_slices
    assert two["num_slices"] == 2 and two["num_chips"] == 8 and two["fits"] is True, stderr[-2000:]
    assert two["mesh"] == {"dcn": 2, "data": 1, "fsdp": 4, "tensor": 1}
    # parameters and optimizer state are replicated across slices, sharded within one: same bytes per chip
    assert two["memory_bytes"]["alias"] == one["memory_bytes"]["alias"]
    assert two["memory_bytes"]["argument"] <= one["memory_bytes"]["argument"]  # the batch splits 8 ways, not 4
    assert not two["warnings"]
