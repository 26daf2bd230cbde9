"""The package's layers, written down once (ARCHITECTURE.md "Layers" repeats them): a module may import from its own
layer and the layers below it, never from a higher one, and the imports between modules have no cycle. Read from the
source with `ast` (every import, also those inside functions), so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "starling_jax"

# Lowest first. A name is a module or sub-package of the package (`eval.metrics`: a module inside one); a module
# belongs to the longest name that contains it. The root's entry points (every root module not named here) form the
# top layer. `eval`'s building blocks (ranking metrics, bucketed scoring, the reward-model scorer) sit below the
# trainers that use them; evaluation itself (RewardBench, win rates, best-of-n, MT-Bench) sits on top of the judges.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "paths", "config", "cli", "hub"),  # base: no model code
    ("parallel",),  # mesh, sharding rules, hardware tables
    ("data",),  # Nectar rows → validated rankings → tokens → batches; tokenizers
    ("model",),  # the decoder, heads, attention, HF interchange
    ("losses", "ckpt"),
    ("sample", "eval.metrics", "eval.score_batches", "eval.scorer"),
    ("train",),  # the shared loop and the RM / SFT / DPO jobs
    ("rl",),  # PPO / APA on the shared loop
    ("judge",),  # ranking answers (label)
    ("eval",),  # evaluation (evaluate)
    ("rounds",),  # on-policy rounds (onpolicy): sample → label → train_dpo / train_rm
]
TOP = len(LAYERS)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports (`from x import y` counts y when y is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "starling_jax":
                found.add(t)
    return found


def layer_of(name: str) -> int:
    parts = name.split(".")[1:]  # without the package's own name
    for n in range(len(parts), 0, -1):  # the longest name that contains the module
        for i, names in enumerate(LAYERS):
            if ".".join(parts[:n]) in names:
                return i
    return TOP


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports(n, p, set(mods)) for n, p in mods.items()}


def test_every_layer_names_something_that_exists():
    known = {n.split(".", 1)[1] for n in modules() if "." in n}
    for names in LAYERS:
        for n in names:
            assert n in known, f"LAYERS names {n!r}, which is no module or sub-package of starling_jax"


def test_no_module_imports_from_a_higher_layer():
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in graph().items()
        for b in targets
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_imports_have_no_cycle():
    g = graph()
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" ↔ ".join(c) for c in cycles)


def test_the_checker_sees_upward_imports_and_cycles(tmp_path):
    """The reader itself: relative and absolute imports, imports inside functions."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from starling_jax.rl import job\n    from ..train import loop\n")
    known = {"starling_jax.rl.job", "starling_jax.train.loop", "starling_jax.data.x"}
    assert imports("starling_jax.data.x", src, known) == {"starling_jax.rl.job", "starling_jax.train.loop"}
    assert layer_of("starling_jax.rl.job") > layer_of("starling_jax.data.x")
