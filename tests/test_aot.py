"""`python -m starling_jax.aot`: ahead-of-time compile of the real train step, memory vs capacity, exit codes.

Runs on the CPU (`--topology cpu`) without libtpu; TPU topologies are exercised only for the missing-libtpu error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from starling_jax import aot
from starling_jax.errors import ConfigError
from starling_jax.model.architectures import architecture

GIB = 1024**3
SMALL = ["data.batch_size=4", "data.max_length=128", "data.num_answers=3"]


def run_aot(*args: str, devices: int = 4) -> tuple[int, dict, str]:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        HF_HUB_OFFLINE="1",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "starling_jax.aot", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return proc.returncode, summary, proc.stderr


def test_cpu_topology_compiles_the_train_step_and_fits():
    rc, s, err = run_aot("--topology", "cpu", "train.micro_batches=2", *SMALL)
    assert rc == 0, err[-2000:]
    for key in (
        "topology",
        "num_chips",
        "per_chip_bytes",
        "hbm_bytes",
        "fits",
        "compile_s",
        "memory_bytes",
        "model_flops_per_step",
        "batch",
    ):
        assert key in s, key
    assert s["topology"] == "cpu" and s["num_chips"] == 4 and s["fits"] is True
    assert s["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert s["batch"] == [4, 3, 128] and s["micro_batches"] == 2
    m = s["memory_bytes"]
    assert s["per_chip_bytes"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"] > 0
    assert m["alias"] > 0  # the state is donated


def test_tiny_capacity_does_not_fit_and_exits_1():
    # the program of the test above (a compilation-cache hit when it ran first): only the capacity differs
    rc, s, err = run_aot("--topology", "cpu", "--hbm-gib", "0.001", "--json", "train.micro_batches=2", *SMALL)
    assert rc == 1, err[-2000:]
    assert s["fits"] is False and s["hbm_bytes"] == int(0.001 * GIB) and s["per_chip_bytes"] > s["hbm_bytes"]


def test_builtin_hub_architecture_with_num_layers_override():
    rc, s, err = run_aot(
        "configs/rm_mistral7b_nectar.yaml",
        "--topology",
        "cpu",
        "--num-layers",
        "1",
        "--json",
        "data.batch_size=4",
        "data.max_length=128",
        "train.micro_batches=1",
        "--hbm-gib",
        "1000",
    )
    assert rc == 0, err[-2000:]
    assert s["model_type"] == "mistral" and s["num_layers"] == 1 and s["scan_layers"] is True
    assert s["num_params"] == 32000 * 4096 + 4096 * 128 * (2 * 32 + 2 * 8) + 3 * 4096 * 14336 + 2 * 4096 + 4096 + 4096


def test_unknown_hub_id_offline_is_a_one_line_error():
    rc, s, err = run_aot("init_from=nobody/unknown-model", "--topology", "cpu")
    assert rc == 2 and s["status"] == "error"
    assert len(err.strip().splitlines()) == 1 and "nobody/unknown-model" in err and "config.json" in err


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here")
def test_tpu_topology_without_libtpu_is_a_one_line_error():
    rc, s, err = run_aot("--topology", "v5p-32", *SMALL)
    assert rc == 2 and s["status"] == "error"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'pip install "starling_jax[tpu]"' in lines[0], err


def test_topology_names_and_capacities():
    with pytest.raises(ConfigError, match="unknown size"):
        aot.topology_devices("v5p-31")
    with pytest.raises(ConfigError, match="expected cpu"):
        aot.topology_devices("tpu-big")
    assert aot.hbm_bytes("TPU v5 lite", 32, None)[0] == 16 * GIB
    assert aot.hbm_bytes("TPU v5", 16, None)[0] == 95 * GIB
    assert aot.hbm_bytes("TPU v6 lite", 16, None)[0] == 32 * GIB
    assert aot.hbm_bytes("TPU v4", 16, None)[0] == 32 * GIB
    assert aot.hbm_bytes("TPU v5", 16, 2.0)[0] == 2 * GIB


def test_tpu_out_of_memory_message_is_parsed():
    msg = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (29.06G) "
        "exceeds available HBM (15.75G)."
    )
    assert aot._OOM.search(msg)
    assert aot._oom_bytes(msg, "HLO temporaries") == int(29.06 * GIB)
    assert aot._oom_bytes(msg, "available HBM") == int(15.75 * GIB)


def _hf_config(folder, arch: str, layers: int, hidden: int) -> str:
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": [arch],
                "model_type": "llama",
                "vocab_size": 256,
                "hidden_size": hidden,
                "intermediate_size": 2 * hidden,
                "num_hidden_layers": layers,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "hidden_act": "silu",
                "max_position_embeddings": 512,
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "tie_word_embeddings": False,
                "bos_token_id": 1,
                "eos_token_id": 2,
            }
        )
    )
    return str(folder)


def rl_role_bytes_per_device(policy: tuple[int, int], rm: tuple[int, int], fsdp: int = 4) -> dict[str, int]:
    """Analytic per-device bytes of each role of `_hf_config` models given as (layers, hidden): the matrices
    (embedding, attention q/k/v/o with 4 heads / 2 KV heads, MLP gate/up/down, heads) split `fsdp` ways, the RMSNorm
    weights (2 per layer + the final one) replicated; actor and critic fp32 (+ AdamW's two fp32 moments), the full
    reference copy and the reward model bf16."""

    def model(layers, hidden, head):
        head_dim = hidden // 4
        layer = hidden * head_dim * (2 * 4 + 2 * 2) + 3 * hidden * (2 * hidden)
        return 256 * hidden + layers * layer + head, layers * 2 * hidden + hidden  # (matrices, norms)

    def per_device(matrices_norms, itemsize):
        matrices, norms = matrices_norms
        return itemsize * (matrices // fsdp + norms)

    (p_layers, p_hidden), (r_layers, r_hidden) = policy, rm
    actor = per_device(model(p_layers, p_hidden, p_hidden * 256), 4)  # untied LM head [D, V]
    critic = per_device(model(p_layers, p_hidden, p_hidden), 4)  # value head [D, 1]
    return {
        "actor": actor,
        "critic": critic,
        "optimizer": 2 * (actor + critic),
        "reference": per_device(model(p_layers, p_hidden, p_hidden * 256), 2),
        "reward": per_device(model(r_layers, r_hidden, r_hidden), 2),
    }  # score head [D, 1]


def test_rl_set_compiles_every_program_on_the_cpu_mesh(tmp_path):
    """PPO from config.json files alone (no weights): sampler, reward model, experience and update compile on 4
    CPU devices; every role's bytes per device equal the analytic count of its parameters (and AdamW state), and
    the compiler's donated update state equals actor + critic + AdamW."""
    policy = _hf_config(tmp_path / "policy", "LlamaForCausalLM", 2, 64)
    rm = _hf_config(tmp_path / "rm", "LlamaForSequenceClassification", 3, 32)
    rc, s, err = run_aot(
        "--topology",
        "cpu",
        "--json",
        f"policy={policy}",
        f"reward_model={rm}",
        "runtime.frozen_param_dtype=bfloat16",
        "rollout.batch_size=8",
        "rollout.minibatch_size=4",
        "rollout.max_new_tokens=8",
        "prompts.max_prompt_tokens=8",
        "prompts.rm_max_length=64",
        "prompts.eval_prompts=8",
    )  # = the rollout batch: no separate eval programs
    assert rc == 0 and s["job"] == "train_ppo" and s["fits"] is True, err[-3000:]
    assert s["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert list(s["programs"]) == ["rollout", "score", "experience", "update"]
    # train_ppo's default runtime.attention_impl auto is einsum on CPU devices: no Pallas kernel in any program
    assert s["attention_impl"] == "einsum" and not any(p["kernel_calls"] for p in s["programs"].values())
    roles, expected = s["roles_bytes"], rl_role_bytes_per_device(policy=(2, 64), rm=(3, 32))
    for name in ("actor", "critic", "reference", "reward"):
        assert roles[name] == expected[name], (name, roles, expected)
    scalars = 64  # AdamW's count, step, iteration, rng, kl_coef, reward statistics
    assert expected["optimizer"] <= roles["optimizer"] <= expected["optimizer"] + scalars, (roles, expected)
    state = expected["actor"] + expected["critic"] + expected["optimizer"]
    alias = s["programs"]["update"]["memory_bytes"]["alias"]
    assert state <= alias <= state + scalars, (alias, state)
    assert s["models"]["reward"]["num_layers"] == 3 and s["models"]["critic"]["num_layers"] == 2
    for name, p in s["programs"].items():
        assert p["compiled"] and p["fits"] and p["memory_bytes"]["temp"] > 0, name
        assert p["per_chip_bytes"] == p["program_bytes"] + p["resident_beside_bytes"], name
    assert s["programs"]["update"]["resident_beside_bytes"] == roles["reference"] + roles["reward"]
    assert s["programs"]["rollout"]["length"] == 16 and s["programs"]["score"]["length"] == 128
    assert s["per_chip_bytes"] == max(p["per_chip_bytes"] for p in s["programs"].values())


def test_rl_minibatch_that_does_not_split_is_refused_and_the_suggested_mesh_compiles(tmp_path):
    """As train_ppo's set-up refuses it (beta's minibatch 16 on v5p-64's 32 chips): a minibatch that is not a
    multiple of the data-parallel devices is one error line naming the key; the mesh the message suggests
    (half the fsdp, tensor 2) is accepted and compiles (one program: the guard runs before any)."""
    policy = _hf_config(tmp_path / "policy", "LlamaForCausalLM", 2, 64)
    rm = _hf_config(tmp_path / "rm", "LlamaForSequenceClassification", 2, 32)
    base = [
        "--topology",
        "cpu",
        "--json",
        f"policy={policy}",
        f"reward_model={rm}",
        "rollout.batch_size=4",
        "rollout.minibatch_size=2",
        "rollout.max_new_tokens=8",
        "prompts.max_prompt_tokens=8",
        "prompts.rm_max_length=64",
        "prompts.eval_prompts=4",
    ]
    rc, s, err = run_aot(*base)
    assert rc == 2 and s["status"] == "error", err[-2000:]
    assert "rollout.minibatch_size=2 is not a multiple of the mesh's 4 data-parallel devices" in s["error"]
    assert "mesh.fsdp=2 mesh.tensor=2" in s["error"]
    assert [line for line in err.splitlines() if line.startswith("error:")] == [f"error: {s['error']}"]
    rc, s, err = run_aot(*base, "mesh.fsdp=2", "mesh.tensor=2", "--programs", "score")
    assert rc == 0 and s["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}, err[-3000:]
    assert list(s["programs"]) == ["score"] and s["programs"]["score"]["compiled"]


def test_rl_set_adds_eval_programs_for_a_larger_eval_batch(tmp_path):
    """Evaluation rolls out all held-out prompts at once: with more of them than the rollout batch, the set holds
    eval programs at that size (abstract only, nothing compiled)."""
    from starling_jax.config import load_config
    from starling_jax.parallel import sharding
    from starling_jax.rl import abstract
    from starling_jax.rl.config import PPORunConfig
    from starling_jax.rl.job import PPOJob

    policy = _hf_config(tmp_path / "policy", "LlamaForCausalLM", 2, 64)
    cfg = load_config(
        PPORunConfig,
        None,
        [
            f"policy={policy}",
            f"reward_model={policy}",
            "critic_init=policy",
            "rollout.batch_size=4",
            "rollout.minibatch_size=2",
            "prompts.eval_prompts=6",
            "num_layers_unfrozen=1",
        ],
    )
    job = PPOJob(cfg)
    import jax

    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    rl = abstract.build(job, mesh, architecture(policy, "policy"), architecture(policy, "reward_model"))
    update = next(p for p in rl.programs if p.name == "update")
    state, minibatch = update.args
    rows = {p.name: p.rows for p in rl.programs}
    assert rows == {
        "rollout": 4,
        "score": 4,
        "experience": 4,
        "update": 2,
        "eval_rollout": 6,
        "eval_score": 6,
        "eval_experience": 6,
    }
    assert minibatch["tokens"].shape == (2, 64 + 24) and set(state) >= {"params", "opt_state", "kl_coef"}
    # hydra reference: the top layer only, so fewer bytes than the actor
    assert aot.sharded_bytes(rl.frozen["reference"]) < aot.sharded_bytes(state["params"]["actor"])
