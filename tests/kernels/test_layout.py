"""fastupg/kernels: no import cycle between its files (imports inside functions included) and no dependency beyond
torch, triton and the standard library (the estimator lives in fastupg/kernels/estimator.py; fastupg.estimator is that module). Read from the source (no import, no interpreter)."""
import ast
import pathlib
import sys

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "fastupg" / "kernels"
ALLOWED = {"torch", "triton"}


def _imports(path: pathlib.Path) -> list[str]:
    """Every module a file imports, anywhere in it; `from fastupg.kernels import name` counts as the submodule when
    `name` is one, else as the package."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_sub = node.module == "fastupg.kernels" and (KERNELS / f"{a.name}.py").exists()
                out.append(sub if is_sub else node.module)
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(KERNELS.glob("*.py")):
        name = "fastupg.kernels" if path.stem == "__init__" else f"fastupg.kernels.{path.stem}"
        graph[name] = {m for m in _imports(path) if m.startswith("fastupg.kernels") and m != name}
    return graph


def test_no_import_cycle():
    graph = _graph()
    assert "fastupg.kernels.logits" in graph and len(graph) >= 8
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_depends_on_torch_and_triton_only():
    for path in sorted(KERNELS.glob("*.py")):
        for mod in _imports(path):
            top = mod.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__" or mod.startswith("fastupg.kernels"):
                continue
            assert top in ALLOWED or mod in ALLOWED, f"{path.name} imports {mod}"
