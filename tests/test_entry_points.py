"""The JAX-only entry points run without PyTorch even where it is installed (`cli.without_torch`): the rule
"torch only in tests, benchmarks and the parity checkers" holds by construction, and transformers and tensorboardX
skip importing it (seconds of start-up per run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")  # the point is a process where torch IS importable

JAX_ONLY = [
    "train_rm",
    "train_sft",
    "train_dpo",
    "train_ppo",
    "prepare_data",
    "score",
    "export_hf",
    "generate",
    "aot",
    "label",
    "gather_answers",
    "evaluate",
    "onpolicy",
]
WITH_TORCH = ["verify_hf", "convert_starling"]  # compare with / read PyTorch checkpoints


def run_python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("module", JAX_ONLY + WITH_TORCH)
def test_programs_hide_torch_exactly_where_they_never_use_it(module):
    """Each entry point run as a program (`runpy`, as `python -m` does; `--help` stops it after the set-up)."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['{module}', '--help']\n"
        "try:\n"
        f"    runpy.run_module('starling_jax.{module}', run_name='__main__', alter_sys=True)\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(repr(sys.modules.get('torch', 'absent')))\n"
    )
    hidden = run_python(code) == "None"
    assert hidden == (module in JAX_ONLY)


def test_without_torch_the_tokenizer_and_metrics_writer_work_and_tokenize_the_same(tmp_path):
    """transformers (AutoTokenizer, chat template) and tensorboardX take their torch-less paths with the same
    results: token ids of the default tokenizer with torch hidden equal those in this process (torch loaded)."""
    from starling_jax.data import tokenizer as tokenizer_lib

    text = "\n\nHuman: Write a short line about rivers.\n\nAssistant: Rivers run to the sea, ünïcödé 123."
    expected = tokenizer_lib.load_tokenizer(tokenizer_lib.default_tokenizer_for("llama2_chat"))(text)["input_ids"]
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from starling_jax.cli import without_torch\n"
        "without_torch()\n"
        "from starling_jax.data import tokenizer as t\n"
        "from starling_jax.train.loop import MetricsWriter\n"
        "tok = t.load_tokenizer(t.default_tokenizer_for('llama2_chat'))\n"
        f"w = MetricsWriter(Path({str(tmp_path)!r}), enabled=True)\n"
        "w.train_row({'step': 1, 'loss': 0.5}); w.close()\n"
        "assert sys.modules['torch'] is None\n"
        f"print(json.dumps(tok({text!r})['input_ids']))\n"
    )
    assert json.loads(run_python(code)) == expected
    assert list((tmp_path / "tensorboard").glob("events.*")) and (tmp_path / "metrics.jsonl").is_file()


def test_every_entry_point_has_a_console_script_and_a_parser():
    """Each root module with a `main` is an entry point: `starling-<name>` runs it, and `build_parser()` gives the
    parser it runs with (the docs site's CLI reference is generated from it)."""
    import ast
    import importlib
    import tomllib

    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    entries = sorted(
        p.stem
        for p in (root / "starling_jax").glob("*.py")
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(p.read_text()).body)
    )
    assert {f"starling-{e.replace('_', '-')}": f"starling_jax.{e}:main" for e in entries} == scripts
    for e in entries:
        parser = importlib.import_module(f"starling_jax.{e}").build_parser()
        assert parser.prog == f"python -m starling_jax.{e}", parser.prog
