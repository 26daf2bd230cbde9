"""configs/rm_base.yaml documents the embedded default: loading it gives exactly the no-argument config."""

from pathlib import Path

from starling_jax.config import load_config, to_dict
from starling_jax.train.rm_config import RMRunConfig

ROOT = Path(__file__).resolve().parent.parent


def test_rm_base_yaml_is_the_embedded_default():
    assert to_dict(load_config(RMRunConfig, ROOT / "configs" / "rm_base.yaml", [])) == \
        to_dict(load_config(RMRunConfig, None, []))


def test_recipes_load_and_pad_to_128():
    for name in ("rm_llama2_7b_starling.yaml", "rm_mistral7b_nectar.yaml"):
        cfg = load_config(RMRunConfig, ROOT / "configs" / name, [])
        assert cfg.data.pad_to_multiple == 128 and cfg.init_from and cfg.model.dtype == "bfloat16"


def test_sft_base_yaml_is_the_embedded_default():
    from starling_jax.train.sft_config import SFTRunConfig

    assert to_dict(load_config(SFTRunConfig, ROOT / "configs" / "sft_base.yaml", [])) == \
        to_dict(load_config(SFTRunConfig, None, []))


def test_dpo_base_yaml_is_the_embedded_default_and_lists_every_key():
    import yaml

    from starling_jax.train.dpo_config import DPORunConfig

    default = to_dict(load_config(DPORunConfig, None, []))
    assert to_dict(load_config(DPORunConfig, ROOT / "configs" / "dpo_base.yaml", [])) == default

    def keys(d, prefix=""):
        return {prefix + k for k in d} | {x for k, v in d.items() if isinstance(v, dict) for x in keys(v, f"{k}.")}

    assert keys(yaml.safe_load((ROOT / "configs" / "dpo_base.yaml").read_text())) == keys(default)
