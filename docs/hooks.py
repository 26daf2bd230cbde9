"""mkdocs hook: writes the generated pages before each build, so they cannot drift from what they describe.

- `reference/cli.md`: every console script of pyproject.toml, from its entry point's `build_parser()` (the same
  parser the command runs with).
- `reference/config.md`: every key of every trainer's run config (the dataclasses `load_config` fills), with its
  default and the comment written beside the field.
- `index.md`, `architecture.md`, `benchmarks.md`: README.md, ARCHITECTURE.md and BENCHMARKS.md of the repository
  root, links rewritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import io
import os
import re
import sys
import tokenize
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "reference"

# (title, YAML file that lists every key with its default, dotted path of the run config dataclass)
RUN_CONFIGS = [
    ("train_rm", "configs/rm_base.yaml", "starling_jax.train.rm_config:RMRunConfig"),
    ("train_sft", "configs/sft_base.yaml", "starling_jax.train.sft_config:SFTRunConfig"),
    ("train_ppo", "configs/ppo_base.yaml", "starling_jax.rl.config:PPORunConfig"),
    ("train_dpo", "configs/dpo_base.yaml", "starling_jax.train.dpo_config:DPORunConfig"),
    ("onpolicy", "configs/onpolicy_base.yaml", "starling_jax.rounds.config:OnPolicyConfig"),
]


def console_scripts() -> dict[str, str]:
    """script name → `module:function`, from pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def parser_markdown(script: str, parser: argparse.ArgumentParser) -> str:
    lines = [
        f"## `{script}`",
        "",
        f"`python -m {parser.prog.split()[-1]}`" if parser.prog.startswith("python -m") else f"`{parser.prog}`",
        "",
    ]
    if parser.description:
        lines += [parser.description.strip().split("\n\n")[0].strip(), ""]
    lines += ["| argument | default | help |", "|---|---|---|"]
    for action in parser._actions:  # argparse has no public iterator over its arguments
        if isinstance(action, argparse._HelpAction):
            continue
        names = ", ".join(action.option_strings) or action.dest
        if action.choices:
            names += " {" + ",".join(map(str, action.choices)) + "}"
        default = "" if action.default in (None, argparse.SUPPRESS, []) else f"`{action.default}`"
        if action.required and action.option_strings:
            default = "required"
        lines.append(f"| `{_cell(names)}` | {_cell(default)} | {_cell(action.help or '')} |")
    return "\n".join(lines) + "\n"


def cli_page() -> str:
    parts = [
        "# Command line",
        "",
        "Generated from each entry point's argument parser when the site is built (`docs/hooks.py`). The "
        "trainers take `[CONFIG.yaml] [key=value ...]`: their keys are in [Config keys](config.md). Every command "
        "ends with a one-line JSON summary whose keys follow one rule "
        "([Architecture](../architecture.md#entry-points-and-their-json-summary)).",
        "",
    ]
    for script, target in sorted(console_scripts().items()):
        module = importlib.import_module(target.split(":")[0])
        parts.append(parser_markdown(script, module.build_parser()))
    return "\n".join(parts)


def field_comments(cls) -> dict[str, str]:
    """The `# ...` comment on each field's line in the dataclass source (the project writes why beside a field)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments, line_field = {}, {}
    for line_no, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        if ":" in stripped and not stripped.startswith(("#", "def ", "class ", "@", '"', "'")):
            name = stripped.split(":", 1)[0].strip()
            if name.isidentifier():
                line_field[line_no] = name
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            comments[line_field[tok.start[0]]] = tok.string.lstrip("#").strip()
    return comments


def config_rows(instance, prefix: str = "") -> list[tuple[str, str, str]]:
    rows = []
    comments = field_comments(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            rows += config_rows(value, key + ".")
        else:
            rows.append((key, repr(value) if isinstance(value, str) else str(value), comments.get(f.name, "")))
    return rows


def config_page() -> str:
    parts = [
        "# Config keys",
        "",
        "Every key of every trainer's run config with its default, generated from the dataclasses when the "
        "site is built (`docs/hooks.py`). Set them in a YAML file or as `key=value` on the command line; an "
        "unknown key or a bad value is a one-line error. Each trainer's base file in `configs/` lists the "
        "same keys (a test checks it).",
        "",
    ]
    for title, base, target in RUN_CONFIGS:
        module, name = target.split(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        parts += [f"## `{title}`", "", f"Base file: `{base}`.", "", "| key | default | note |", "|---|---|---|"]
        parts += [f"| `{k}` | `{_cell(v)}` | {_cell(c)} |" for k, v, c in config_rows(cls())]
        parts.append("")
    return "\n".join(parts)


def root_page(name: str) -> str:
    """A root markdown file as a docs page: links to the other root files point to their pages, links to files of
    the repository (configs, code) to plain text (the site holds only the docs)."""
    text = (ROOT / name).read_text(encoding="utf-8")
    text = text.replace("](BENCHMARKS.md", "](benchmarks.md").replace("](ARCHITECTURE.md", "](architecture.md")
    text = text.replace("](README.md", "](index.md").replace("](docs/", "](")
    return re.sub(
        r"\[([^\]]+)\]\((?!https?://|#|benchmarks\.md|architecture\.md|index\.md)([^)]+)\)", r"\1 (`\2`)", text
    )


def write_reference() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    OUT.mkdir(exist_ok=True)
    (OUT / "cli.md").write_text(cli_page(), encoding="utf-8")
    (OUT / "config.md").write_text(config_page(), encoding="utf-8")
    docs = Path(__file__).resolve().parent
    (docs / "architecture.md").write_text(root_page("ARCHITECTURE.md"), encoding="utf-8")
    (docs / "benchmarks.md").write_text(root_page("BENCHMARKS.md"), encoding="utf-8")
    (docs / "index.md").write_text(root_page("README.md"), encoding="utf-8")


def on_pre_build(config, **kwargs) -> None:  # mkdocs hook
    write_reference()


if __name__ == "__main__":
    write_reference()
