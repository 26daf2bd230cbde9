"""The two PPO/APA recipes start as written from Hub ids: a HuggingFace cache built in a temporary HF_HOME holds tiny
models under the recipes' exact ids, `HF_HUB_OFFLINE=1`, and `train_ppo CONFIG.yaml` with only sizes overridden runs
two iterations and exports. A missing id and a pickle-only snapshot are one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from starling_jax.config import load_config
from starling_jax.data.chat import to_hh
from starling_jax.data.tokenizer import default_tokenizer_dir
from starling_jax.rl.config import PPORunConfig
from tests.entrypoints import env_with, summary
from tests.hub_cache import add_to_hub_cache, folder_files
from tests.model.hf_fixtures import make_hf_model
from tests.rl.fixtures import QUESTIONS

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {
    "alpha": ROOT / "configs" / "ppo_openchat35_starling_alpha.yaml",
    "beta": ROOT / "configs" / "ppo_openchat35_beta.yaml",
}
# Sizes only: the recipes' models, templates, algorithm, KL, reward shaping, layers trained, dtypes and mesh stay.
SIZES = [
    "prompts.eval_prompts=4",
    "prompts.max_prompt_tokens=48",
    "prompts.rm_max_length=128",
    "rollout.batch_size=4",
    "rollout.minibatch_size=2",
    "rollout.max_new_tokens=8",
    "train.steps=2",
]


def recipe(name: str) -> PPORunConfig:
    return load_config(PPORunConfig, RECIPES[name])


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """HF_HOME whose hub cache holds tiny models under the recipes' ids: OpenChat-3.5-like policies (Mistral,
    OpenChat tokenizer: <|end_of_turn|> one token, 32,002 ids; 5 layers, so the recipes' 4 trained layers leave a
    frozen bottom) and reward models (Llama *ForSequenceClassification, the Llama-2 vocabulary)."""
    root = tmp_path_factory.mktemp("hub")
    home = root / "hf_home"
    policy = make_hf_model(root / "policy", "mistral", head="lm", vocab=32002, layers=5, sliding_window=4096)
    rm = make_hf_model(root / "rm", "llama", head="score", vocab=32000, layers=2, seed=1)
    openchat = default_tokenizer_dir("openchat_3.5", openchat_special_tokens=True)
    for name in ("alpha", "beta"):
        cfg = recipe(name)
        add_to_hub_cache(home, cfg.policy, folder_files(policy, openchat))
        rm_tokenizer = default_tokenizer_dir(cfg.prompts.rm_template)
        add_to_hub_cache(home, cfg.reward_model, folder_files(rm, rm_tokenizer))
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": to_hh([{"role": "user", "content": f"{q} ({i})"}])}) + "\n"
            for i in range(2)
            for q in QUESTIONS[:6]
        )
    )
    return home, prompts


@pytest.mark.slow  # two train_ppo subprocesses, each 2 iterations of tiny models: ~2 min on the 2-core machine
@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_recipe_runs_as_written_from_cached_hub_ids(hf_home, tmp_path, name):
    home, prompts = hf_home
    out = tmp_path / name
    cmd = [
        sys.executable,
        "-m",
        "starling_jax.train_ppo",
        str(RECIPES[name]),
        *SIZES,
        f"prompts.train={prompts}",
        f"output_dir={out}",
    ]
    proc = subprocess.run(
        cmd,
        env=env_with(1, HF_HOME=str(home), HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc.stdout)
    cfg = recipe(name)
    assert s["status"] == "completed" and s["steps"] == 2 and s["algorithm"] == cfg.algorithm, s
    # the run used the cached snapshots of the recipes' ids
    written = load_config(PPORunConfig, out / "config.yaml")
    assert (written.policy, written.reward_model) == (cfg.policy, cfg.reward_model)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (out / "checkpoints" / "2").is_dir() and (out / "samples.jsonl").is_file()
    hf = Path(s["hf_export_dir"])
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (hf / f).is_file(), f
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]


def test_missing_hub_id_offline_is_one_line(tmp_path, capsys, monkeypatch):
    """The alpha recipe as written with an empty cache, offline: one `error:` line naming `policy=ID`."""
    from huggingface_hub import constants

    from starling_jax import train_ppo

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert train_ppo.main([str(RECIPES["alpha"]), f"output_dir={tmp_path / 'out'}"]) == 2
    cap = capsys.readouterr()
    err = [line for line in cap.err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "Traceback" not in cap.err, cap.err
    assert err[0].startswith(
        f"error: policy=openchat/openchat_3.5: not a local folder, and not in the HuggingFace "
        f"Hub cache {tmp_path / 'hub'} (HF_HUB_OFFLINE=1"
    ), err[0]
    assert "`hf download openchat/openchat_3.5 " in err[0] and err[0].endswith("or pass a local folder")
    assert json.loads(cap.out.strip().splitlines()[-1])["status"] == "error"


def test_pickle_only_reward_model_names_convert_starling(tmp_path, capsys, monkeypatch):
    """Upstream, berkeley-nest/Starling-RM-7B-alpha holds only a pickle: its snapshot (configs and tokenizer, no
    safetensors) is refused in one line that names the conversion command."""
    import numpy as np
    from huggingface_hub import constants
    from safetensors.numpy import save

    from starling_jax import train_ppo

    alpha = recipe("alpha")
    cache = tmp_path / "hf_home"
    add_to_hub_cache(
        cache,
        alpha.policy,
        {  # resolved first: a *ForCausalLM with safetensors
            "config.json": json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}).encode(),
            "model.safetensors": save({"model.embed_tokens.weight": np.zeros((2, 2), np.float32)}),
        },
    )
    snapshot = add_to_hub_cache(
        cache,
        alpha.reward_model,
        folder_files(default_tokenizer_dir("llama2_chat"))
        | {"config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}).encode()},
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache / "hub"))
    assert train_ppo.main([str(RECIPES["alpha"]), f"output_dir={tmp_path / 'out'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert err == [
        (
            f"error: reward_model={alpha.reward_model}: the Hub snapshot {snapshot} has no safetensors weights "
            "(starling_jax never downloads or unpickles .bin/.pt weights); convert them to a safetensors "
            "folder and pass that (the pickled berkeley-nest/Starling-RM-7B-alpha: `python -m "
            "starling_jax.convert_starling` writes runs/starling_rm_7b_alpha_hf)"
        )
    ], err
