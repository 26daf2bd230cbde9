"""configs/rm_base.yaml documents the embedded default: loading it gives exactly the no-argument config."""

from pathlib import Path

import pytest

from starling_jax.config import load_config, to_dict
from starling_jax.errors import ConfigError
from starling_jax.train.rm_config import RMRunConfig, tiny_model

ROOT = Path(__file__).resolve().parent.parent


def test_rm_base_yaml_is_the_embedded_default():
    assert to_dict(load_config(RMRunConfig, ROOT / "configs" / "rm_base.yaml", [])) == \
        to_dict(load_config(RMRunConfig, None, []))


def test_recipes_load_and_pad_to_128():
    for name in ("rm_llama2_7b_starling.yaml", "rm_mistral7b_nectar.yaml"):
        cfg = load_config(RMRunConfig, ROOT / "configs" / name, [])
        assert cfg.data.pad_to_multiple == 128 and cfg.init_from and cfg.runtime.dtype == "bfloat16"


def test_sft_base_yaml_is_the_embedded_default():
    from starling_jax.train.sft_config import SFTRunConfig

    assert to_dict(load_config(SFTRunConfig, ROOT / "configs" / "sft_base.yaml", [])) == \
        to_dict(load_config(SFTRunConfig, None, []))


# ------------------------------------------------------------------------------------------------ runtime section
def test_every_trainer_has_the_same_runtime_section():
    """train_rm, train_sft and train_ppo: one `runtime:` section, same keys and defaults (auto attention); PPO adds
    only frozen_param_dtype (its reference and reward model)."""
    import dataclasses

    from starling_jax.rl.config import PPORunConfig
    from starling_jax.train.runtime import RLRuntimeConfig, RuntimeConfig
    from starling_jax.train.sft_config import SFTRunConfig

    rm, sft, ppo = RMRunConfig().runtime, SFTRunConfig().runtime, PPORunConfig().runtime
    assert type(rm) is type(sft) is RuntimeConfig and type(ppo) is RLRuntimeConfig
    assert dataclasses.asdict(rm) == dataclasses.asdict(sft) == {
        k: v for k, v in dataclasses.asdict(ppo).items() if k != "frozen_param_dtype"}
    assert rm.attention_impl == "auto" and rm.attention_block == 0 and ppo.frozen_param_dtype == "float32"
    # the runtime fields reach the model config (RM/SFT without init_from) and the RL models' load kwargs
    cfg = load_config(RMRunConfig, None, ["runtime.attention_impl=blockwise", "runtime.attention_block=32",
                                          "runtime.mlp_chunks=2", "runtime.dtype=bfloat16"])
    m = cfg.model_config
    assert (m.attention_impl, m.attention_block, m.mlp_chunks, m.dtype) == ("blockwise", 32, 2, "bfloat16")
    assert cfg.model.attention_impl == "einsum"  # the `model` section holds the architecture only
    kw = load_config(PPORunConfig, None, ["runtime.attention_impl=splash", "runtime.frozen_param_dtype=bfloat16"]
                     ).runtime.model_kwargs(frozen=True)
    assert kw["attention_impl"] == "splash" and kw["param_dtype"] == "bfloat16"


def test_a_saved_config_loads_again(tmp_path):
    """config.yaml (what launch re-runs) leaves the moved model.<runtime> keys out, so it loads to the same config."""
    from starling_jax.config import save_config

    for name in ("rm_llama2_7b_starling.yaml", "rm_base.yaml"):
        cfg = load_config(RMRunConfig, ROOT / "configs" / name, ["runtime.attention_impl=blockwise"])
        save_config(cfg, tmp_path / "config.yaml")
        assert "attention_impl" not in (tmp_path / "config.yaml").read_text().split("runtime:")[0]
        assert load_config(RMRunConfig, tmp_path / "config.yaml", []) == cfg


def run_main(main, args, capsys) -> tuple[int, str, dict]:
    import json

    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.err.strip().splitlines()[-1], json.loads(captured.out.strip().splitlines()[-1])


@pytest.mark.parametrize("entry,override", [("train_rm", "model.attention_impl=blockwise"),
                                            ("train_sft", "model.remat_policy=full"),
                                            ("train_rm", "model.scan_layers=true")])
def test_old_model_runtime_keys_are_refused_naming_the_new_key(entry, override, capsys):
    import importlib

    key, _, value = override.partition("=")
    new = "runtime." + key.split(".", 1)[1]
    rc, err, summary = run_main(importlib.import_module(f"starling_jax.{entry}").main, [override], capsys)
    assert rc == 2 and summary["status"] == "error"
    assert err == (f"error: command line override {override!r}: {key} is now {new} (the runtime section every "
                   f"trainer shares); write {new}={value}")


def test_old_model_runtime_keys_in_a_file_are_refused(tmp_path, capsys):
    from starling_jax import train_sft

    (tmp_path / "old.yaml").write_text("model:\n  hidden_size: 64\n  attention_impl: einsum\n")
    rc, err, _ = run_main(train_sft.main, [str(tmp_path / "old.yaml")], capsys)
    assert rc == 2 and err == (f"error: {tmp_path / 'old.yaml'}: model.attention_impl is now runtime.attention_impl "
                               "(the runtime section every trainer shares); move it under runtime:")
    with pytest.raises(ConfigError, match=r"model.mlp_chunks=2: this key moved to runtime.mlp_chunks"):
        RMRunConfig(model=tiny_model().replace(mlp_chunks=2))


def test_train_ppo_refuses_freeze_layers_and_an_attention_that_cannot_read_rollouts(capsys):
    from starling_jax import train_ppo

    rc, err, summary = run_main(train_ppo.main, ["optim.freeze_layers=28"], capsys)
    assert rc == 2 and summary["status"] == "error"
    assert err == ("error: optim.freeze_layers=28 does not apply to train_ppo: set num_layers_unfrozen=N (only the "
                   "top N policy layers train) and critic_layers_unfrozen")
    rc, err, _ = run_main(train_ppo.main, ["runtime.attention_impl=fused"], capsys)
    assert rc == 2 and err.startswith("error: runtime.attention_impl=fused cannot handle the rollouts' left-padded "
                                      "rows"), err
