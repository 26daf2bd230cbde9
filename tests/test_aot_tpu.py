"""`python -m starling_jax.aot` for real TPU topologies, compiled on this CPU host with libtpu (the `tpu` extra).

Skipped where libtpu is not installed; `.ci/run` runs this file in a layered environment that adds it. A reduced
TPU-shaped reward model (hidden 512 = 4 × 128 lanes, so every per-chip shard is tile-aligned) on a v5e-4 slice
and on two v5e-4 slices joined over DCN:
- start-up prints none of libtpu's metadata errors;
- the per-chip train state the compiler reports equals an analytic count of parameters and AdamW state;
- two slices keep that state per chip (parameters replicated across slices, sharded within) on a (dcn, ...) mesh,
  with `runtime.attention_impl=auto` resolved to the splash kernels;
- the RL set (actor + critic + AdamW, hydra reference, reward model; config.json only): the per-chip bytes of
  every role equal an analytic count, and the compiler's donated update state and reward-model arguments agree;
  with train_ppo's default `runtime.attention_impl: auto` its update, experience and score programs call splash;
- `remat_policy=full_offload` puts the layer inputs in host memory (an analytic count).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the tpu extra); .ci/run's AOT step provides it"
)

D, F, V, LAYERS, HEADS, KV, HEAD_DIM = 512, 1024, 32000, 2, 4, 4, 128
FSDP = 4  # a v5e-4 slice: 4 chips, mesh fsdp=-1
CONFIG = [
    f"model.hidden_size={D}",
    f"model.intermediate_size={F}",
    f"model.vocab_size={V}",
    f"model.num_hidden_layers={LAYERS}",
    f"model.num_attention_heads={HEADS}",
    f"model.num_key_value_heads={KV}",
    "runtime.scan_layers=true",
    "runtime.remat_policy=full",
    "runtime.attention_impl=einsum",
    "data.batch_size=8",
    "data.num_answers=2",
    "data.max_length=128",
    "data.pad_to_multiple=128",
]
LIBTPU_START_UP_ERRORS = (
    "could not determine TPU accelerator type",
    "TPU_WORKER_HOSTNAMES",
    "INVALID_ARGUMENT",
    "Failed to find host bounds",
)


# The RL set: a TPU-shaped Mistral policy (actor; critic from its trunk) and a deeper Llama reward model, given by
# their config.json only; hydra reference (top layer), frozen roles in bf16, fp32 trainable weights and AdamW.
RL_V, POLICY_LAYERS, RM_LAYERS, UNFROZEN = 4096, 2, 3, 1
RL_CONFIG = [
    "num_layers_unfrozen=1",
    "rollout.batch_size=8",
    "rollout.minibatch_size=4",
    "rollout.max_new_tokens=16",
    "prompts.max_prompt_tokens=112",
    "prompts.rm_max_length=128",
    "runtime.param_dtype=float32",
    "runtime.frozen_param_dtype=bfloat16",
    "runtime.dtype=bfloat16",
    "runtime.scan_layers=true",
    "runtime.remat_policy=full",
]


def write_hf_config(folder, arch: str, model_type: str, layers: int) -> str:
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": [arch],
                "model_type": model_type,
                "vocab_size": RL_V,
                "hidden_size": D,
                "intermediate_size": F,
                "num_hidden_layers": layers,
                "num_attention_heads": HEADS,
                "num_key_value_heads": KV,
                "head_dim": HEAD_DIM,
                "hidden_act": "silu",
                "max_position_embeddings": 1024,
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "tie_word_embeddings": False,
                "bos_token_id": 1,
                "eos_token_id": 2,
            }
        )
    )
    return str(folder)


def start_aot(*args: str, config: list[str] = CONFIG) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "starling_jax.aot", *config, "--json", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result(proc: subprocess.Popen) -> tuple[int, dict, str]:
    stdout, stderr = proc.communicate(timeout=900)
    assert stdout.strip(), stderr[-3000:]
    return proc.returncode, json.loads(stdout.strip().splitlines()[-1]), stderr


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The compiles at once (each is mostly one single-threaded XLA TPU compile). The RL set compiles its update
    and reward-model programs only (the sampler and experience programs are compiled on the CPU mesh in
    test_aot.py): the two that hold the trainable state and the reward model."""
    tmp = tmp_path_factory.mktemp("rl")
    rl_config = [
        f"policy={write_hf_config(tmp / 'policy', 'MistralForCausalLM', 'mistral', POLICY_LAYERS)}",
        f"reward_model={write_hf_config(tmp / 'rm', 'LlamaForSequenceClassification', 'llama', RM_LAYERS)}",
        *RL_CONFIG,
    ]
    # the two-slice compile also runs the recipes' `attention_impl: auto`, which must pick splash for a TPU mesh
    one = start_aot("--topology", "v5e-4")
    two = start_aot("--topology", "v5e-4", "--num-slices", "2", config=[*CONFIG, "runtime.attention_impl=auto"])
    # the RL set with train_ppo's default `runtime.attention_impl: auto`: splash in every program for a TPU mesh
    rl = start_aot("--topology", "v5e-4", "--programs", "update,score,experience", config=rl_config)
    levers = start_aot(
        "--topology", "v5e-4", config=[*CONFIG, "runtime.remat_policy=full_offload", "runtime.mlp_chunks=4"]
    )
    return {"one": result(one), "two": result(two), "rl": result(rl), "levers": result(levers)}


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
    assert one["attention_impl"] == "einsum" and two["attention_impl"] == "splash"
    # parameters and optimizer state are replicated across slices, sharded within one: same bytes per chip
    assert two["memory_bytes"]["alias"] == one["memory_bytes"]["alias"]
    assert two["memory_bytes"]["argument"] <= one["memory_bytes"]["argument"]  # the batch splits 8 ways, not 4
    assert not two["warnings"]


def test_offload_moves_the_layer_inputs_to_host_memory(one_slice, compiled):
    """`remat_policy=full_offload` (+ `mlp_chunks`): what full remat keeps of the forward, every layer's input
    [layers, rows per chip, L, D] (fp32 here), is in host memory, to the byte; `full` keeps nothing there.
    (Whether the chip's temporaries then shrink depends on the shape: at this toy size XLA's TPU buffer assignment
    does not shrink them; for the 7B recipes they fall 10.47 → 5.83 GiB, BENCHMARKS.md.)"""
    rc, s, stderr = compiled["levers"]
    assert rc == 0 and s["remat_policy"] == "full_offload" and s["mlp_chunks"] == 4, stderr[-3000:]
    rows_per_chip = 8 * 2 // FSDP
    assert s["memory_bytes"]["host_temp"] == LAYERS * rows_per_chip * 128 * D * 4, s["memory_bytes"]
    _, full, _ = one_slice
    assert full["memory_bytes"]["host_temp"] == 0


def rl_role_bytes_per_chip() -> dict[str, int]:
    """Matrices split FSDP ways, RMSNorm weights replicated; trainable roles fp32, frozen ones bf16."""
    layer = D * HEAD_DIM * (2 * HEADS + 2 * KV) + 3 * D * F

    def per_chip(matrices, norms, itemsize):
        return itemsize * (matrices // FSDP + norms)

    actor = per_chip(RL_V * D + POLICY_LAYERS * layer + D * RL_V, POLICY_LAYERS * 2 * D + D, 4)  # + LM head
    critic = per_chip(RL_V * D + POLICY_LAYERS * layer + D, POLICY_LAYERS * 2 * D + D, 4)  # + value head [D, 1]
    reference = per_chip(UNFROZEN * layer + D * RL_V, UNFROZEN * 2 * D + D, 2)  # hydra: top layer, norm, LM head
    reward = per_chip(RL_V * D + RM_LAYERS * layer + D, RM_LAYERS * 2 * D + D, 2)
    return {
        "actor": actor,
        "critic": critic,
        "optimizer": 2 * (actor + critic),
        "reference": reference,
        "reward": reward,
    }


def test_rl_set_per_chip_state_matches_the_analytic_count(compiled):
    rc, s, stderr = compiled["rl"]
    assert rc == 0 and s["job"] == "train_ppo" and s["fits"] is True, stderr[-3000:]
    assert s["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert set(s["programs"]) == {"update", "score", "experience"}
    for message in LIBTPU_START_UP_ERRORS:
        assert message not in stderr, stderr[-3000:]
    expected = rl_role_bytes_per_chip()
    roles = s["roles_bytes"]
    scalars = 64  # step, iteration, rng, kl_coef, reward statistics, AdamW's count
    for name in ("actor", "critic", "reference", "reward"):
        assert roles[name] == expected[name], (name, roles, expected)
    assert expected["optimizer"] <= roles["optimizer"] <= expected["optimizer"] + scalars, (roles, expected)
    # the compiler's own figures: the donated state the update aliases, the reward model the scorer reads
    update, score = s["programs"]["update"], s["programs"]["score"]
    state = expected["actor"] + expected["critic"] + expected["optimizer"]
    assert abs(update["memory_bytes"]["alias"] - state) <= 0.01 * state, (update, state)
    assert update["resident_beside_bytes"] == expected["reference"] + expected["reward"]
    rm_batch = 4 * (3 * 8 * 128 + 8) // FSDP  # tokens, positions, segment ids [8, 128] + reward index, int32
    assert expected["reward"] <= score["memory_bytes"]["argument"] <= expected["reward"] + 2 * rm_batch, score
    assert score["resident_beside_bytes"] == sum(expected.values()) - expected["reward"] + (
        roles["optimizer"] - expected["optimizer"]
    )
    assert s["per_chip_bytes"] == max(p["per_chip_bytes"] for p in s["programs"].values())
    assert all(p["per_chip_bytes"] == p["program_bytes"] + p["resident_beside_bytes"] for p in s["programs"].values())


def test_rl_programs_compile_with_auto_resolved_to_splash(compiled):
    """train_ppo's default `runtime.attention_impl: auto` on a TPU topology: the report says splash, and the
    lowered update (actor + critic forward/backward), experience (actor, hydra reference, critic forwards) and
    score (reward model) programs all call the Pallas kernel: no program materializes [rows, heads, L, L] scores."""
    rc, s, stderr = compiled["rl"]
    assert rc == 0 and s["attention_impl"] == "splash", stderr[-3000:]
    for name in ("update", "experience", "score"):
        assert s["programs"][name]["compiled"] and s["programs"][name]["kernel_calls"] > 0, (name, s["programs"][name])
