"""The package's layering (docs/architecture.md): imports only go downward, no cycles,
no private names across modules, and importing the library sets nothing up."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "regionvlp"

# Lowest layer first; a module may import its own layer or a lower one. The first
# matching prefix places a module (longest prefixes are listed before shorter ones).
LAYERS: list[tuple[str, ...]] = [
    ("regionvlp.errors", "regionvlp.limits", "regionvlp.runtime", "regionvlp.pathways", "regionvlp.resolvers", "regionvlp.ds_schema", "regionvlp.jsonio",
     "regionvlp.config", "regionvlp.runfolder", "regionvlp.dist", "regionvlp.optim", "regionvlp.hub"),
    ("regionvlp.data", "regionvlp.remote", "regionvlp.qa.vocab", "regionvlp.qa.metrics"),
    ("regionvlp.outputs", "regionvlp.layers", "regionvlp.losses", "regionvlp.text"),
    ("regionvlp.detector", "regionvlp.region_learner", "regionvlp.qa.head"),
    ("regionvlp.fused",),  # joins both pathways
    ("regionvlp.model",),
    ("regionvlp.checkpoint", "regionvlp.remote_run"),
    ("regionvlp.evaluation", "regionvlp.qa.evaluate"),
    ("regionvlp.train",),
    ("regionvlp.bench",),
    ("regionvlp.compare", "regionvlp.report", "regionvlp.demo", "regionvlp.show", "regionvlp.qa.stage",
     "regionvlp.region_cache"),
    ("regionvlp.cli", "regionvlp.__main__"),
]
# pairs in one layer that must not know each other (either direction)
SIBLINGS_APART = [("regionvlp.detector", "regionvlp.region_learner")]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    if module in ("regionvlp", "regionvlp.qa"):
        return 0  # the package root (its version, load_model re-exported lazily); qa's docstring
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} has no layer: place it in LAYERS (tests/test_layout.py) and docs/architecture.md")


def imports_of(path: Path) -> list[tuple[str, str | None]]:
    """(module, imported name) for every regionvlp import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.startswith("regionvlp")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("regionvlp") and not node.level:
            out += [(node.module, a.name) for a in node.names]
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for m, path in modules.items():
        for target, name in imports_of(path):
            full = f"{target}.{name}" if name and f"{target}.{name}" in modules else target
            if full != m and not full.startswith(m + "."):  # a package importing its children is fine
                edges[m].add(full)
    return edges


def test_imports_only_go_downward():
    wrong = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
             for m, targets in graph().items() for t in targets if m != "regionvlp" and layer_of(t) > layer_of(m)]
    assert not wrong, "\n".join(wrong)


def test_pathways_do_not_know_each_other():
    edges = graph()
    for a, b in SIBLINGS_APART:
        crossing = [(m, t) for m, ts in edges.items() for t in ts
                    if (m.startswith(a) and t.startswith(b)) or (m.startswith(b) and t.startswith(a))]
        assert not crossing, crossing


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t in edges and not state.get(t):
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(edges):
        if not state.get(m):
            visit(m, [m])


def test_no_private_name_crosses_a_module():
    crossing = [f"{module_name(p)} imports {t}.{n}" for p in PKG.rglob("*.py") for t, n in imports_of(p)
                if n and n.startswith("_") and not n.startswith("__")]
    assert not crossing, crossing


def test_no_function_over_80_lines():
    long = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{module_name(p)}:{node.name} {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def test_importing_the_library_sets_nothing_up():
    """Importing regionvlp, its checkpoint format and evaluation neither sets environment
    variables (DeepSpeed's accelerator) nor imports the training code or DeepSpeed."""
    code = ("import os, sys; before = dict(os.environ); import regionvlp, regionvlp.checkpoint, "
            "regionvlp.evaluation; assert dict(os.environ) == before, set(os.environ) ^ set(before); "
            "bad = [m for m in sys.modules if m.startswith(('regionvlp.train', 'deepspeed'))]; assert not bad, bad")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
