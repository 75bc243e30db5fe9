"""The shape of the source tree (issue 13): no import circle, no reach into another module's private names, lower
layers never importing upper ones, and no source file over ~500 lines without a reason stated at its top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "int8eval"
MAX_LINES = 520  # ~500: a file may run a little over before it must say why

# Lower layers never import upper ones, not even inside a function: (package or module, what it must not import).
LAYERS = [
    ("int8eval.config", ("int8eval.",)),  # nothing of int8eval but errors (allowed below)
    ("int8eval.errors", ("int8eval.",)),
    ("int8eval.report", ("int8eval.bench", "int8eval.backends", "int8eval.session", "int8eval.commands", "int8eval.cli",
                         "int8eval.diagnose", "int8eval.models", "int8eval.evaluate", "int8eval.verdict")),
    ("int8eval.backends", ("int8eval.session", "int8eval.commands", "int8eval.cli", "int8eval.report", "int8eval.bench",
                           "int8eval.diagnose", "int8eval.verdict")),
    ("int8eval.data", ("int8eval.session", "int8eval.commands", "int8eval.cli", "int8eval.backends", "int8eval.models",
                       "int8eval.bench", "int8eval.diagnose")),
    ("int8eval.models", ("int8eval.session", "int8eval.commands", "int8eval.cli", "int8eval.backends", "int8eval.bench",
                         "int8eval.report", "int8eval.diagnose")),
    ("int8eval.session", ("int8eval.commands", "int8eval.cli")),
    ("int8eval.commands", ("int8eval.cli",)),
]
ALLOWED = {("int8eval.config", "int8eval.errors")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(path: Path, module: str):
    """(imported module, names, at module level) for every `import int8eval...` / `from int8eval... import ...`
    (relative imports resolved); imports under `if TYPE_CHECKING:` are not run, so they are left out."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("int8eval"):
                yield base, [a.name for a in node.names], id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("int8eval"):
                    yield alias.name, [], id(node) in top


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def _targets(module: str, imported: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """What importing runs: the module (or, for `from pkg import mod`, the submodule) and every package above it,
    except the packages above `module` itself (already running when `module` runs)."""
    found = []
    for name in names or [""]:
        target = f"{imported}.{name}" if name and f"{imported}.{name}" in modules else imported
        found += [target] + [a for a in _ancestors(target) if a not in _ancestors(module)]
    return [t for t in found if t in modules]


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for imported, names, top in _imports(path, module):
            if top or not module_level_only:
                graph[module] |= {t for t in _targets(module, imported, names, modules) if t != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    # Package __init__ modules run when any of their modules is imported, so they count as part of the circle.
    cycle = _cycle(_graph(module_level_only=True))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_import_of_another_modules_private_names():
    bad = []
    for module, path in _modules().items():
        for imported, names, _ in _imports(path, module):
            bad += [f"{module} imports {imported}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer, forbidden", LAYERS)
def test_lower_layers_never_import_upper_ones(layer, forbidden):
    bad = []
    for module, targets in _graph(module_level_only=False).items():
        if module != layer and not module.startswith(layer + "."):
            continue
        for t in targets:
            inside = t == layer or t.startswith(layer + ".")
            if not inside and (module.split(".")[0:2] != t.split(".")[0:2]) and any(
                t == f.rstrip(".") or t.startswith(f if f.endswith(".") else f + ".") or t == f for f in forbidden
            ) and (layer, t) not in ALLOWED and t != "int8eval":
                bad.append(f"{module} imports {t}")
    assert not bad, "\n".join(sorted(bad))


def test_long_files_say_why_at_their_top():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and "longer than 500 lines" not in "\n".join(lines[:30]):
            long.append(f"{path.relative_to(SRC)}: {len(lines)} lines")
    assert not long, "files over ~500 lines without a reason ('longer than 500 lines: ...') at their top:\n" + "\n".join(long)


def test_the_checks_see_a_circle_and_a_private_import(tmp_path):
    """The checks themselves: a hand-made circle is found, and a private import is listed."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    path = tmp_path / "m.py"
    path.write_text("from int8eval.x import _hidden, shown\nif TYPE_CHECKING:\n    from int8eval.y import z\n")
    assert list(_imports(path, "int8eval.m")) == [("int8eval.x", ["_hidden", "shown"], True)]
