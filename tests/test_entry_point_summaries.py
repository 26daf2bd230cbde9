"""Entry points alike: every entry point's last line is a JSON summary that follows one rule (`cli.STATUSES`, written
down in ARCHITECTURE.md "Entry points"): `status` is one of completed | failed | preempted | error | interrupted,
a folder written is `output_dir`, a file written is `output`; and `--help` states the defaults and loads no heavy
library (JAX, numpy, torch, transformers, TensorFlow, huggingface_hub), so it returns well under a second."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from starling_jax import cli

PACKAGE = Path(__file__).resolve().parents[1] / "starling_jax"
ENTRY_POINTS = sorted(
    p.stem
    for p in PACKAGE.glob("*.py")
    if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(p.read_text()).body)
)
# entry point → (the key naming what it writes, the module whose dicts build its summary). `output_dir`: a folder;
# `output`: a file; None: it writes nothing. Every entry point is listed (a new one must say what it writes).
WRITES = {
    "train_rm": ("output_dir", "train/loop.py"),
    "train_sft": ("output_dir", "train/loop.py"),
    "train_dpo": ("output_dir", "train/loop.py"),
    "train_ppo": ("output_dir", "train/loop.py"),
    "prepare_data": ("output_dir", "prepare_data.py"),
    "export_hf": ("output_dir", "export_hf.py"),
    "convert_starling": ("output_dir", "convert_starling.py"),
    "evaluate": ("output_dir", "evaluate.py"),
    "base_configs": ("output_dir", "base_configs.py"),
    "generate": ("output", "sample/chat.py"),
    "score": ("output", "score.py"),
    "label": ("output", "judge/labelling.py"),
    "gather_answers": ("output", "judge/gather.py"),
    "onpolicy": ("output_dir", "rounds/chain.py"),
    "verify_hf": (None, "verify_hf.py"),
    "aot": (None, "aot.py"),
}
HEAVY = ("jax", "flax", "numpy", "torch", "transformers", "tensorflow", "huggingface_hub")


def test_every_entry_point_says_what_it_writes():
    assert sorted(WRITES) == ENTRY_POINTS


def _status_dicts(tree: ast.AST) -> list[ast.Dict]:
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "status" for k in n.keys)
    ]


def _status_values(tree: ast.AST):
    """(line, the expression given to `status`) of every summary dict literal and `x["status"] = ...`; a name is
    followed to the string constants assigned to it in the same module."""
    assigned: dict[str, list] = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Assign):
            for t in n.targets:
                if isinstance(t, ast.Name):
                    assigned.setdefault(t.id, []).append(n.value)
    found = []
    for d in _status_dicts(tree):
        found += [v for k, v in zip(d.keys, d.values) if isinstance(k, ast.Constant) and k.value == "status"]
    for n in ast.walk(tree):
        if isinstance(n, ast.Assign) and any(
            isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant) and t.slice.value == "status"
            for t in n.targets
        ):
            found.append(n.value)
    out = []
    for v in found:
        stack = [v]
        while stack:
            e = stack.pop()
            if isinstance(e, ast.IfExp):
                stack += [e.body, e.orelse]
            elif isinstance(e, ast.Name):
                stack += [a for a in assigned.get(e.id, []) if isinstance(a, (ast.Constant, ast.IfExp))]
            else:
                out.append((v.lineno, e.value if isinstance(e, ast.Constant) else ast.unparse(e)))
    return out


def test_status_values_follow_the_rule():
    """Every `status` any module of the package puts in a summary is one of `cli.STATUSES` (read from the source,
    so a branch no test runs is checked too)."""
    bad = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: status {value!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, value in _status_values(ast.parse(path.read_text(encoding="utf-8")))
        if value not in cli.STATUSES
    ]
    assert not bad, "\n".join(bad) + f"\nallowed: {cli.STATUSES}"
    assert set(cli.EXIT_CODES) == set(cli.STATUSES)


@pytest.mark.parametrize("entry", sorted(WRITES))
def test_summary_names_what_it_writes(entry):
    """The summary of an entry point that writes a folder has `output_dir` (never `output`); one that writes a file
    has `output`."""
    key, source = WRITES[entry]
    dicts = _status_dicts(ast.parse((PACKAGE / source).read_text(encoding="utf-8")))
    keys = [{k.value for k in d.keys if isinstance(k, ast.Constant)} for d in dicts]
    if key is not None:
        assert any(key in k for k in keys), f"{entry}: no summary in {source} names {key!r}"
    if key == "output_dir":
        assert not any("output" in k for k in keys), f"{entry} writes a folder: its summary says output_dir"


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_usage_error_is_the_uniform_error_summary(entry, capsys):
    """Every entry point, given an unknown flag: one `error:` line, exit 2, and the summary with status "error",
    `error_type` and `error` (the same keys `cli.error_summary` gives every user mistake)."""
    module = importlib.import_module(f"starling_jax.{entry}")
    rc = module.main(["--no-such-flag"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert rc == cli.EXIT_CODES["error"] == 2
    assert summary["status"] == "error" and summary["error_type"] == "UsageError", summary
    assert summary["error"] and len(captured.err.strip().splitlines()) == 1, captured.err


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_states_defaults_and_loads_no_heavy_library(entry):
    """`python -m starling_jax.<entry> --help` (as a program): every argument with a default states it, and the
    process imports none of HEAVY and spends well under a second of CPU (CPU, not wall time: the machine is
    shared)."""
    code = (
        "import contextlib, io, json, runpy, sys, time\n"
        f"sys.argv = ['{entry}', '--help']\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        f"        runpy.run_module('starling_jax.{entry}', run_name='__main__', alter_sys=True)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), e.code\n"
        f"heavy = [m for m in {HEAVY!r} if sys.modules.get(m) is not None]\n"
        "print(json.dumps({'cpu_s': time.process_time(), 'heavy': heavy, 'help': out.getvalue()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"{entry} --help imports {result['heavy']}"
    assert result["cpu_s"] < 1.0, result["cpu_s"]
    assert "usage:" in result["help"]

    parser = importlib.import_module(f"starling_jax.{entry}").build_parser()
    parsers = [parser] + [
        p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()
    ]
    for p in parsers:
        formatter = p._get_formatter()
        for action in p._actions:
            if cli.HelpFormatter.shows_default(action):
                text = formatter._format_action(action)
                assert "default" in text.lower(), f"{p.prog} {action.option_strings or action.dest}: {text!r}"
