"""The house rules that keep the rooms apart (issue 22): no import circle among the pack's modules (imports at
module level: a function-level import is a deliberate late binding), and no product module (the package, the
nodes, the user-facing scripts) imports the tests or puts them on ``sys.path``."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ["__init__.py", "krea2_model", "nodes", "scripts/demo.py"]


def _files(parts):
    for part in parts:
        p = ROOT / part
        yield from ([p] if p.is_file() else sorted(p.rglob("*.py")))


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def _imports(path: Path, top_only: bool):
    """Absolute module names imported by ``path`` (relative imports resolved), at module level when ``top_only``."""
    tree = ast.parse(path.read_text(), str(path))
    mod = _module(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    nodes = tree.body if top_only else list(ast.walk(tree))
    if top_only:  # module level, including inside try / if blocks there
        nodes = [n for stmt in tree.body for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield name
            for a in node.names:  # `from . import hooks` imports the submodule
                yield f"{name}.{a.name}"


def test_no_product_module_imports_the_tests():
    bad = []
    for f in _files(PRODUCT):
        for name in _imports(f, top_only=False):
            if name == "tests" or name.startswith("tests."):
                bad.append(f"{f.relative_to(ROOT)} imports {name}")
        text = f.read_text()
        if "sys.path" in text and ('"tests"' in text or "'tests'" in text):
            bad.append(f"{f.relative_to(ROOT)} puts the tests on sys.path")
    assert not bad, bad


def test_no_import_circle_among_the_pack_modules():
    files = list(_files(["krea2_model", "nodes"]))
    known = {_module(f) for f in files}
    graph = {}
    for f in files:
        graph[_module(f)] = sorted({n for n in _imports(f, top_only=True) if n in known and n != _module(f)})
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, cycles[:5]
    assert len(graph) > 40  # the walk saw the whole pack
