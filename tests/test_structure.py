"""The import structure of the shipped packages, read with ``ast`` (nothing is imported).

- no import cycle among their modules: each strongly connected component of the import
  graph is reported with its members and the imports that close it. Every import counts,
  also one inside a function or under ``if TYPE_CHECKING:``: both still tie two modules
  together, and a module can be read, tested and moved alone only without them;
- the dashboard (``speedloader_tui``) imports nothing from slctl (``speedloader_cli``);
- no shipped module imports the dev lab (``speedloader_lab``), the tests, the benchmarks
  or the scripts, and the wheel's package list leaves them out;
- no Python file in the repository edits ``sys.path``: pytest has ``pythonpath``, and
  the benchmarks and the demo run with the repository root on the module path.
"""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SHIPPED_PATTERNS: list[str] = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
DEV_ONLY = ("speedloader_lab", "tests", "bench", "scripts", "vmlab")
# Not the repository's own code: a virtualenv or build output someone left in the checkout.
_FOREIGN = {".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__"}


def shipped_packages(root: Path = REPO) -> list[str]:
    """The top-level packages the wheel holds: those pyproject's packages.find includes."""
    return sorted(
        p.name
        for p in root.iterdir()
        if (p / "__init__.py").is_file()
        and any(fnmatch.fnmatch(p.name, pat) for pat in SHIPPED_PATTERNS)
    )


def modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``packages`` below ``root``."""
    found = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imported_names(name: str, path: Path) -> Iterator[tuple[str, list[str], int]]:
    """Each import in module ``name``'s file: the module it names (relative imports
    resolved), the names taken from it (``from m import x, y``; empty for ``import m``),
    and the line."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*base_parts, node.module] if node.module else base_parts)
            else:
                base = node.module or ""
            yield base, [a.name for a in node.names], node.lineno


def import_graph(mods: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {module it imports: first line}. ``from pkg import sub`` is an edge to the
    submodule, not to the package: a package is imported before any of its modules anyway,
    so counting that would make every package whose __init__ imports a module a cycle."""
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for m, path in mods.items():
        for base, names, line in imported_names(m, path):
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in mods]
            if len(targets) < len(names) or not names:  # names of base's own, or import base
                parts = base.split(".")
                while parts and ".".join(parts) not in mods:
                    parts.pop()  # import a.b.c of a module a.b (c a name in it)
                targets.append(".".join(parts))
            for target in targets:
                if target in mods and target != m:
                    graph[m].setdefault(target, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return sorted(found)


def describe(
    comp: list[str], graph: dict[str, dict[str, int]], mods: dict[str, Path], root: Path = REPO
) -> str:
    inside = set(comp)
    edges = [
        f"    {m} -> {n}  ({mods[m].relative_to(root)}:{line})"
        for m in comp
        for n, line in sorted(graph[m].items())
        if n in inside
    ]
    return f"cycle of {len(comp)}: {', '.join(comp)}\n" + "\n".join(edges)


def test_no_import_cycle_among_the_shipped_modules():
    mods = modules(REPO, shipped_packages())
    graph = import_graph(mods)
    found = cycles(graph)
    assert found == [], "import cycles:\n" + "\n".join(describe(c, graph, mods) for c in found)


def test_the_dashboard_imports_nothing_from_slctl():
    mods = modules(REPO, ["speedloader_tui"])
    bad = [
        f"{path.relative_to(REPO)}:{line}: {base}"
        for m, path in mods.items()
        for base, _, line in imported_names(m, path)
        if base.split(".", 1)[0] == "speedloader_cli"
    ]
    assert bad == [], "speedloader_tui imports speedloader_cli:\n" + "\n".join(sorted(bad))


def test_no_shipped_module_imports_dev_code_and_the_wheel_leaves_it_out():
    shipped = shipped_packages()
    assert "speedloaderd" in shipped and "speedloader_cli" in shipped  # the check sees them
    assert not set(shipped) & set(DEV_ONLY), f"the wheel would ship {set(shipped) & set(DEV_ONLY)}"
    mods = modules(REPO, shipped)
    bad = sorted(
        f"{path.relative_to(REPO)}:{line}: {base}"
        for m, path in mods.items()
        for base, _, line in imported_names(m, path)
        if base.split(".", 1)[0] in DEV_ONLY
    )
    assert bad == [], "shipped code imports dev-only code:\n" + "\n".join(bad)


_LIST_MUTATORS = {"insert", "append", "extend", "remove", "pop", "clear", "__setitem__"}


def sys_path_edits(path: Path) -> list[int]:
    """Lines of ``path`` that change ``sys.path``: assigning it or an item or slice of it,
    or calling one of its mutating methods, or ``site.addsitedir``."""
    tree = ast.parse(path.read_text(), str(path))
    from_sys_path = any(
        isinstance(n, ast.ImportFrom)
        and n.module == "sys"
        and any(a.name == "path" and a.asname is None for a in n.names)
        for n in ast.walk(tree)
    )

    def is_sys_path(node: ast.AST) -> bool:
        text = ast.unparse(node)
        return text == "sys.path" or (text == "path" and from_sys_path)

    lines = []
    for node in ast.walk(tree):
        targets: list[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = list(node.targets)
        for t in targets:
            if is_sys_path(t.value if isinstance(t, ast.Subscript) else t):
                lines.append(node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            mutates = f.attr in _LIST_MUTATORS and is_sys_path(f.value)
            if mutates or ast.unparse(f) == "site.addsitedir":
                lines.append(node.lineno)
    return sorted(set(lines))


def repo_python_files(root: Path = REPO) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if not _FOREIGN & set(path.relative_to(root).parts):
            yield path


def test_no_file_in_the_repository_edits_sys_path():
    files = list(repo_python_files())
    assert REPO / "scripts" / "demo.py" in files and REPO / "bench" / "bus.py" in files
    bad = [f"{p.relative_to(REPO)}:{line}" for p in files for line in sys_path_edits(p)]
    assert bad == [], "sys.path edited (use pytest's pythonpath or PYTHONPATH):\n" + "\n".join(bad)


# --- the checks can fail -------------------------------------------------------------------


def test_the_checks_find_a_cycle_an_import_from_slctl_and_a_sys_path_edit(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")  # no cycle with a: see import_graph
    (pkg / "a.py").write_text("from .sub import b\nX = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import X\n"
    )
    (pkg / "c.py").write_text("def f():\n    import pkg.a.X\n")  # nothing imports c
    (pkg / "d.py").write_text("from speedloader_cli.client import Client\n")
    mods = modules(tmp_path, ["pkg"])
    graph = import_graph(mods)

    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]
    shown = describe(["pkg.a", "pkg.sub.b"], graph, mods, tmp_path)
    assert (
        "pkg.a -> pkg.sub.b  (pkg/a.py:1)" in shown
        and "pkg.sub.b -> pkg.a  (pkg/sub/b.py:3)" in shown
    )
    assert graph["pkg"] == {"pkg.a": 1} and graph["pkg.c"] == {"pkg.a": 2}
    assert [b for b, _, _ in imported_names("pkg.d", pkg / "d.py")] == ["speedloader_cli.client"]

    edits = tmp_path / "edits.py"
    edits.write_text(
        "import sys\nfrom sys import path\nsys.path.insert(0, 'x')\nsys.path[:0] = ['y']\n"
        "path.append('z')\nsys.path = []\nprint(sys.path)\nx = sys.path.index('x')\n"
        "import site\nsite.addsitedir('w')\n"
    )
    assert sys_path_edits(edits) == [3, 4, 5, 6, 10]
