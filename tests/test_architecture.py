"""The architecture contract: layers (import-linter, configured in pyproject.toml), no import
cycles between chatsmith modules, imports at the top of modules."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "chatsmith"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports():
    """(module, imported chatsmith module, at top level?) for every import between chatsmith modules."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    out = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chatsmith"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("chatsmith")]
            else:
                continue
            for t in targets:
                out.append((name, t, id(node) in top_level, node.lineno))
    return modules, out


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is not installed: scripts/setup.sh installs import-linter from requirements.txt")
    r = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_no_import_cycles():
    modules, imports = _imports()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for a, b, _, _ in imports:
        if b in modules and b != a and not a.startswith(b + "."):  # a package's own __init__ re-exports are fine
            graph[a].add(b)
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_imports_sit_at_the_top_of_modules():
    """Under 10% of the import statements between chatsmith modules sit inside functions (a lazy
    import hides a dependency and, often, a cycle)."""
    _, imports = _imports()
    statements = {(a, line): top for a, _, top, line in imports}
    inner = sorted(k for k, top in statements.items() if not top)
    assert len(inner) < 0.10 * len(statements), \
        f"{len(inner)} of {len(statements)} chatsmith import statements inside functions: {inner}"
