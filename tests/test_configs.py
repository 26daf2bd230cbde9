"""configs/*_base.yaml document the embedded defaults (every key, its default value), and the recipes' comments name
commands, sections and files that exist."""

import dataclasses
import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from starling_jax.config import load_config, to_dict
from starling_jax.errors import ConfigError
from starling_jax.train.rm_config import RMRunConfig, tiny_model

ROOT = Path(__file__).resolve().parent.parent


def test_rm_base_yaml_is_the_embedded_default():
    assert to_dict(load_config(RMRunConfig, ROOT / "configs" / "rm_base.yaml", [])) == to_dict(
        load_config(RMRunConfig, None, [])
    )


def test_recipes_load_and_pad_to_128():
    for name in ("rm_llama2_7b_starling.yaml", "rm_mistral7b_nectar.yaml"):
        cfg = load_config(RMRunConfig, ROOT / "configs" / name, [])
        assert cfg.data.pad_to_multiple == 128 and cfg.init_from and cfg.runtime.dtype == "bfloat16"


def test_sft_base_yaml_is_the_embedded_default():
    from starling_jax.train.sft_config import SFTRunConfig

    assert to_dict(load_config(SFTRunConfig, ROOT / "configs" / "sft_base.yaml", [])) == to_dict(
        load_config(SFTRunConfig, None, [])
    )


# ------------------------------------------------------------------------------------------------ base files
BASES = [
    ("rm_base.yaml", "starling_jax.train.rm_config", "RMRunConfig"),
    ("sft_base.yaml", "starling_jax.train.sft_config", "SFTRunConfig"),
    ("ppo_base.yaml", "starling_jax.rl.config", "PPORunConfig"),
    ("dpo_base.yaml", "starling_jax.train.dpo_config", "DPORunConfig"),
    ("onpolicy_base.yaml", "starling_jax.rounds.config", "OnPolicyConfig"),
]


def dataclass_leaves(obj, prefix: str = "", moved=None):
    """(dotted key, default) of every leaf of a dataclass instance, nested sections walked recursively; keys the
    schema lists as moved (`MOVED_KEYS`: old spellings a file may not use) left out."""
    moved = getattr(type(obj), "MOVED_KEYS", None) or {} if moved is None else moved
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if prefix + f.name in moved:
            continue
        if dataclasses.is_dataclass(value):
            yield from dataclass_leaves(value, f"{prefix}{f.name}.", moved)
        else:
            yield prefix + f.name, value


def as_plain(value):
    return [as_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("name,module,cls", BASES)
def test_base_yaml_lists_every_key_with_its_default(name, module, cls):
    """The file as written (no schema merged in) holds every key of the run config with the embedded default's
    value, and no other key: a key added to a dataclass and forgotten here fails."""
    schema = getattr(importlib.import_module(module), cls)
    written = yaml.safe_load((ROOT / "configs" / name).read_text())
    missing, wrong = [], []
    for key, default in dataclass_leaves(schema()):
        node = written
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
        else:
            same_type = (
                type(node) is type(default)
                or isinstance(default, (list, tuple))
                or (isinstance(default, float) and type(node) is int)
            )  # YAML `1` for 1.0
            if as_plain(node) != as_plain(default) or not same_type:
                wrong.append(f"{key}: {node!r} in the file, {default!r} by default")
    assert not missing, f"configs/{name} lacks {missing} (python -m starling_jax.base_configs writes them)"
    assert not wrong, wrong
    leaves = {key for key, _ in dataclass_leaves(schema())}
    sections = {key.rsplit(".", 1)[0] for key in leaves if "." in key}

    def file_keys(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict) and f"{prefix}{k}" in sections:
                yield from file_keys(v, f"{prefix}{k}.")
            else:
                yield prefix + k

    assert set(file_keys(written)) == leaves
    # and it loads as the embedded default runs
    assert to_dict(load_config(schema, ROOT / "configs" / name, [])) == to_dict(schema())


def test_base_files_are_what_the_generator_writes(capsys):
    """`python -m starling_jax.base_configs --check`: the committed files are its output (comments kept)."""
    from starling_jax import base_configs

    assert base_configs.main(["--check"]) == 0, capsys.readouterr().out


def test_generator_adds_a_new_key_with_the_dataclass_comment():
    from starling_jax import base_configs

    @dataclasses.dataclass
    class Inner:
        kept: int = 1  # from the source
        # above the new key
        added: str | None = None  # the new key's own comment

    @dataclasses.dataclass
    class Outer:
        seed: int = 0
        inner: Inner = dataclasses.field(default_factory=Inner)

    old = "# header\n\nseed: 0                          # hand-written\n\ninner:\n  kept: 1\n"
    text = base_configs.render(Outer, old)
    assert text == (
        "# header\n\nseed: 0                          # hand-written\n\ninner:\n  kept: 1\n"
        "  # above the new key\n  added: null                    # the new key's own comment\n"
    )


# ------------------------------------------------------------------------------------------------ recipe comments
def headings(path: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in path.read_text().splitlines() if re.match(r"^#{1,6} ", line)}


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_config_comments_name_what_exists(config):
    """Every README / BENCHMARKS section a config's comments name is a heading there, every `python -m` command is
    a module of the package, every file named is in the repository, and nothing points outside it."""
    # the comments as one text (a quoted section name may wrap onto the next comment line)
    comments = " ".join(
        line.split("#", 1)[1].strip() for line in (ROOT / "configs" / config).read_text().splitlines() if "#" in line
    )
    assert "../" not in comments and "/work/" not in comments and "shared/reference" not in comments
    for doc, name in (("README", "README.md"), ("BENCHMARKS", "BENCHMARKS.md")):
        for section in re.findall(rf'{doc}(?:\.md)?(?:\'s)? "([^"]+)"', comments):
            assert section in headings(ROOT / name), f"{config}: {name} has no section {section!r}"
    for page, section in re.findall(r'(docs/[\w-]+\.md) "([^"]+)"', comments):  # the docs site's pages
        assert (ROOT / page).is_file() and section in headings(ROOT / page), f"{config}: {page} has no {section!r}"
    for module in re.findall(r"python -m (starling_jax[\w.]*)", comments):
        assert importlib.util.find_spec(module) is not None, f"{config}: no module {module}"
    for path in re.findall(r"(?<![\w/.:])((?:[\w-]+/)*[\w-]+\.(?:yaml|py|sh|md))\b", comments):
        assert any((ROOT / where / path).exists() for where in (".", "configs", "starling_jax")), (
            f"{config}: {path} does not exist"
        )


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
    assert (
        dataclasses.asdict(rm)
        == dataclasses.asdict(sft)
        == {k: v for k, v in dataclasses.asdict(ppo).items() if k != "frozen_param_dtype"}
    )
    assert rm.attention_impl == "auto" and rm.attention_block == 0 and ppo.frozen_param_dtype == "float32"
    # the runtime fields reach the model config (RM/SFT without init_from) and the RL models' load kwargs
    cfg = load_config(
        RMRunConfig,
        None,
        [
            "runtime.attention_impl=blockwise",
            "runtime.attention_block=32",
            "runtime.mlp_chunks=2",
            "runtime.dtype=bfloat16",
        ],
    )
    m = cfg.model_config
    assert (m.attention_impl, m.attention_block, m.mlp_chunks, m.dtype) == ("blockwise", 32, 2, "bfloat16")
    assert cfg.model.attention_impl == "einsum"  # the `model` section holds the architecture only
    kw = load_config(
        PPORunConfig, None, ["runtime.attention_impl=splash", "runtime.frozen_param_dtype=bfloat16"]
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


@pytest.mark.parametrize(
    "entry,override",
    [
        ("train_rm", "model.attention_impl=blockwise"),
        ("train_sft", "model.remat_policy=full"),
        ("train_rm", "model.scan_layers=true"),
    ],
)
def test_old_model_runtime_keys_are_refused_naming_the_new_key(entry, override, capsys):
    import importlib

    key, _, value = override.partition("=")
    new = "runtime." + key.split(".", 1)[1]
    rc, err, summary = run_main(importlib.import_module(f"starling_jax.{entry}").main, [override], capsys)
    assert rc == 2 and summary["status"] == "error"
    assert err == (
        f"error: command line override {override!r}: {key} is now {new} (the runtime section every "
        f"trainer shares); write {new}={value}"
    )


def test_old_model_runtime_keys_in_a_file_are_refused(tmp_path, capsys):
    from starling_jax import train_sft

    (tmp_path / "old.yaml").write_text("model:\n  hidden_size: 64\n  attention_impl: einsum\n")
    rc, err, _ = run_main(train_sft.main, [str(tmp_path / "old.yaml")], capsys)
    assert rc == 2 and err == (
        f"error: {tmp_path / 'old.yaml'}: model.attention_impl is now runtime.attention_impl "
        "(the runtime section every trainer shares); move it under runtime:"
    )
    with pytest.raises(ConfigError, match=r"model.mlp_chunks=2: this key moved to runtime.mlp_chunks"):
        RMRunConfig(model=tiny_model().replace(mlp_chunks=2))


def test_train_ppo_refuses_freeze_layers_and_an_attention_that_cannot_read_rollouts(capsys):
    from starling_jax import train_ppo

    rc, err, summary = run_main(train_ppo.main, ["optim.freeze_layers=28"], capsys)
    assert rc == 2 and summary["status"] == "error"
    assert err == (
        "error: optim.freeze_layers=28 does not apply to train_ppo: set num_layers_unfrozen=N (only the "
        "top N policy layers train) and critic_layers_unfrozen"
    )
    rc, err, _ = run_main(train_ppo.main, ["runtime.attention_impl=fused"], capsys)
    assert rc == 2 and err.startswith(
        "error: runtime.attention_impl=fused cannot handle the rollouts' left-padded rows"
    ), err
