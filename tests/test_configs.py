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


# ------------------------------------------------------------------------------------------------ base files
BASES = [("rm_base.yaml", "starling_jax.train.rm_config", "RMRunConfig"),
         ("sft_base.yaml", "starling_jax.train.sft_config", "SFTRunConfig"),
         ("ppo_base.yaml", "starling_jax.rl.config", "PPORunConfig")]


def dataclass_leaves(obj, prefix: str = ""):
    """(dotted key, default) of every leaf of a dataclass instance, nested sections walked recursively."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from dataclass_leaves(value, f"{prefix}{f.name}.")
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
            same_type = (type(node) is type(default) or isinstance(default, (list, tuple))
                         or (isinstance(default, float) and type(node) is int))  # YAML `1` for 1.0
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
    assert text == ("# header\n\nseed: 0                          # hand-written\n\ninner:\n  kept: 1\n"
                    "  # above the new key\n  added: null                    # the new key's own comment\n")


# ------------------------------------------------------------------------------------------------ recipe comments
def headings(path: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in path.read_text().splitlines() if re.match(r"^#{1,6} ", line)}


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_config_comments_name_what_exists(config):
    """Every README / BENCHMARKS section a config's comments name is a heading there, every `python -m` command is
    a module of the package, every file named is in the repository, and nothing points outside it."""
    # the comments as one text (a quoted section name may wrap onto the next comment line)
    comments = " ".join(line.split("#", 1)[1].strip() for line in (ROOT / "configs" / config).read_text().splitlines()
                        if "#" in line)
    assert "../" not in comments and "/work/" not in comments and "shared/reference" not in comments
    for doc, name in (("README", "README.md"), ("BENCHMARKS", "BENCHMARKS.md")):
        for section in re.findall(rf'{doc}(?:\.md)?(?:\'s)? "([^"]+)"', comments):
            assert section in headings(ROOT / name), f"{config}: {name} has no section {section!r}"
    for module in re.findall(r"python -m (starling_jax[\w.]*)", comments):
        assert importlib.util.find_spec(module) is not None, f"{config}: no module {module}"
    for path in re.findall(r"(?<![\w/.:])((?:[\w-]+/)*[\w-]+\.(?:yaml|py|sh|md))\b", comments):
        assert any((ROOT / where / path).exists() for where in (".", "configs", "starling_jax")), \
            f"{config}: {path} does not exist"
