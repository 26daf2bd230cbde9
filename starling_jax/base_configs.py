"""configs/{rm,sft,ppo,dpo,onpolicy}_base.yaml: every key of a run config with the embedded default's value, written
from the run-config dataclasses.

    python -m starling_jax.base_configs [--check]

Each file lists every key of its run config (`RMRunConfig`, `SFTRunConfig`, `PPORunConfig`, `DPORunConfig`,
`OnPolicyConfig`), nested sections included, in the dataclasses' order, with the value the entry point runs with
when given no arguments. A key's comment is the one the file already has (hand-written comments survive a
rewrite), else the dataclass's own: the `# ...` after the field and the comment lines just above it. The file's
header (its leading comment block) is kept. `--check` writes nothing and exits 1 when a file differs from what
would be written. (tests/test_configs.py walks the dataclasses itself, so a key missing from a file fails there
whether or not this was run.)
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import re
import sys
import textwrap
import tokenize
from pathlib import Path

import yaml

from starling_jax import cli

ROOT = Path(__file__).resolve().parent.parent
COMMENT_COLUMN = 33  # where a trailing comment starts, as in the hand-written files
MAX_LINE = 120  # the project's line length: a longer comment goes above its key, wrapped
# file → (module, run-config class, the header of a new file)
BASES = {
    "rm_base.yaml": ("starling_jax.train.rm_config", "RMRunConfig", "python -m starling_jax.train_rm"),
    "sft_base.yaml": ("starling_jax.train.sft_config", "SFTRunConfig", "python -m starling_jax.train_sft"),
    "ppo_base.yaml": ("starling_jax.rl.config", "PPORunConfig", "python -m starling_jax.train_ppo"),
    "dpo_base.yaml": ("starling_jax.train.dpo_config", "DPORunConfig", "python -m starling_jax.train_dpo"),
    "onpolicy_base.yaml": ("starling_jax.rounds.config", "OnPolicyConfig", "python -m starling_jax.onpolicy"),
}
_KEY = re.compile(r"^(\s*)([A-Za-z_][\w]*):(.*)$")


def schema_of(name: str) -> type:
    module, cls, _ = BASES[name]
    return getattr(importlib.import_module(module), cls)


def field_comments(cls: type) -> dict[str, tuple[list[str], str]]:
    """field name → (comment lines just above its definition, its trailing comment) from `cls`'s source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))  # a class defined in a function is indented
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}  # 1-based line → comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for i, line in enumerate(lines, start=1):
        m = re.match(r"^    ([A-Za-z_]\w*)\s*:", line)
        if not m or m.group(1) not in names or m.group(1) in out:
            continue
        above, j = [], i - 1
        while j >= 1 and lines[j - 1].strip().startswith("#"):
            above.insert(0, comments.get(j, ""))
            j -= 1
        out[m.group(1)] = (above, comments.get(i, "") if not line.strip().startswith("#") else "")
    return out


def existing_comments(text: str) -> tuple[list[str], dict[str, tuple[list[str], str]]]:
    """A base file → (its header lines, dotted key → (comment lines above it, its trailing comment))."""
    lines = text.splitlines()
    header, i = [], 0
    while i < len(lines) and not _KEY.match(lines[i]):
        header.append(lines[i])
        i += 1
    while header and not header[-1].strip():
        header.pop()
    # the header ends at the first blank line: comment lines after it belong to the first key
    if "" in [h.strip() for h in header]:
        cut = max(k for k, h in enumerate(header) if not h.strip())
        pending = [h.strip().lstrip("#").strip() for h in header[cut + 1 :]]
        header = header[:cut]
    else:
        pending = []
    out: dict[str, tuple[list[str], str]] = {}
    path: list[tuple[int, str]] = []
    for line in lines[i:]:
        m = _KEY.match(line)
        if not m:
            stripped = line.strip()
            if stripped.startswith("#"):
                pending.append(stripped.lstrip("#").strip())
            elif not stripped:
                pending = []
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while path and path[-1][0] >= indent:
            path.pop()
        path.append((indent, key))
        trailing = re.search(r"\s#\s?(.*)$", " " + rest)
        out[".".join(k for _, k in path)] = (pending, trailing.group(1).strip() if trailing else "")
        pending = []
    return header, out


def yaml_words(comment: str) -> str:
    """A dataclass comment in YAML's words: None, True, False → null, true, false."""
    return re.sub(
        r"\b(None|True|False)\b", lambda m: {"None": "null", "True": "true", "False": "false"}[m.group(1)], comment
    )


def scalar(value) -> str:
    """A YAML scalar (or flow list / mapping) as OmegaConf reads it back to `value`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return yaml.safe_dump(
            list(value) if isinstance(value, tuple) else value, default_flow_style=True, width=10_000
        ).strip()
    text = yaml.safe_dump(value, width=10_000).strip()
    return text[: -len("\n...")].strip() if text.endswith("\n...") else text


def _line(indent: str, text: str, comment: str) -> str:
    if not comment:
        return indent + text
    body = indent + text
    return f"{body.ljust(COMMENT_COLUMN - 1)} # {comment}" if len(body) < COMMENT_COLUMN - 1 else f"{body}  # {comment}"


def render(schema: type, old_text: str = "", command: str = "") -> str:
    """The base YAML of `schema`'s default instance, comments from `old_text` (a previous version) or the source."""
    header, old = existing_comments(old_text) if old_text else ([], {})
    if not header:
        header = [
            f"# Every key of a `{command}` run, with the embedded default's values (what it runs with no",
            "# arguments). Copy a section into your own YAML to change it, or override on the command line:",
            f"#   {command} configs/{{file}} train.steps=10",
            "# Unknown keys and wrong types are refused with a one-line error naming the key.",
            "# Written by `python -m starling_jax.base_configs` from the run-config dataclasses.",
        ]
    out = list(header) + [""]
    moved = getattr(schema, "MOVED_KEYS", None) or {}  # old spellings a file may not use (config.load_config)

    def walk(obj, prefix: str, depth: int) -> None:
        source = field_comments(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = prefix + f.name
            if key in moved:
                continue
            # a key the file has keeps its comments (none included); a new key gets the dataclass's
            if key in old:
                above, trailing = old[key]
            else:
                src_above, src_trailing = source.get(f.name, ([], ""))
                above, trailing = [yaml_words(c) for c in src_above], yaml_words(src_trailing)
            indent = "  " * depth
            text = f"{f.name}:" if dataclasses.is_dataclass(value) else f"{f.name}: {scalar(value)}"
            if trailing and len(_line(indent, text, trailing)) > MAX_LINE:
                above, trailing = [*above, trailing], ""  # too long beside the key: above it
            width = MAX_LINE - 2 - len(indent)
            if any(len(c) > width for c in above):  # re-flow the block as one paragraph
                above = textwrap.wrap(" ".join(above), width)
            if dataclasses.is_dataclass(value):
                if depth == 0 and out[-1] != "":
                    out.append("")
                out.extend(f"{indent}# {c}".rstrip() for c in above)
                out.append(_line(indent, text, trailing))
                walk(value, key + ".", depth + 1)
            else:
                out.extend(f"{indent}# {c}".rstrip() for c in above)
                out.append(_line(indent, text, trailing))

    walk(schema(), "", 0)
    return "\n".join(out) + "\n"


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m starling_jax.base_configs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file would change")
    parser.add_argument("--configs", default=str(ROOT / "configs"), help="the configs folder")
    return parser


def main(argv=None) -> int:
    parser = build_parser()

    def run():
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        stale = []
        for name, (_, _, command) in BASES.items():
            path = Path(args.configs) / name
            old = path.read_text() if path.is_file() else ""
            new = render(schema_of(name), old, command).replace("{file}", name)
            if new != old:
                stale.append(name)
                if not args.check:
                    path.write_text(new)
        # --check with stale files: status "failed" (exit 1), the files under `stale`
        return {
            "status": "failed" if args.check and stale else "completed",
            "output_dir": None if args.check else str(args.configs),  # --check writes nothing
            ("stale" if args.check else "written"): stale,
        }

    return cli.run_main(run)


if __name__ == "__main__":
    sys.exit(main())
