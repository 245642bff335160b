"""Imports follow docs/architecture.md: no import against the declared order, no cycle between packages.

Every import of every module under ``cellssl/`` is read with ``ast`` (those inside functions too)
and checked against the table "Packages and what they may import" of docs/architecture.md, the
one place the rule is written down.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "cellssl"
DOC = REPO / "docs" / "architecture.md"
TABLE_HEADING = "## Packages and what they may import"


def allowed_imports(doc: str) -> dict[str, set[str]]:
    """``{package: packages it may import}`` from the doc's table (first backticked name of a row ->
    the backticked names of its last column)."""
    lines = doc.split(TABLE_HEADING, 1)[1].splitlines()
    rows = [ln for ln in lines[lines.index(next(ln for ln in lines if ln.startswith("|"))):] if ln.startswith("|")]
    table: dict[str, set[str]] = {}
    for row in rows[2:]:  # header and separator
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        name = re.findall(r"`([^`]+)`", cells[0])[0]
        table[name] = set(re.findall(r"`([^`]+)`", cells[-1]))
    return table


def unit_of(path: Path) -> str:
    """The package a file belongs to: ``eval`` for cellssl/eval/*.py, ``cli`` for cellssl/cli.py and
    cellssl/__main__.py, ``cellssl`` for cellssl/__init__.py."""
    rel = path.relative_to(PACKAGE)
    if len(rel.parts) > 1:
        return rel.parts[0]
    return {"__init__": "cellssl", "__main__": "cli"}.get(rel.stem, rel.stem)


def target_unit(module: str) -> str | None:
    """The cellssl package an imported module belongs to (None for other libraries)."""
    parts = module.split(".")
    if parts[0] != "cellssl":
        return None
    if len(parts) > 1 and ((PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file()):
        return unit_of(PACKAGE / parts[1] / "x.py" if (PACKAGE / parts[1]).is_dir() else PACKAGE / f"{parts[1]}.py")
    return "cellssl"  # the package itself (its version)


def imports(source: str, module: str) -> list[tuple[int, str, bool, str]]:
    """``(line, imported module, inside a function, source line)`` for every import of ``source``
    (``module``: its dotted name, to resolve relative imports)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = module.split(".")[: len(module.split(".")) - child.level] if child.level else []
                resolved = ".".join(base + ([child.module] if child.module else []))
                # "from cellssl import eval" / "from .. import eval": the names are the packages
                names = [f"{resolved}.{a.name}" for a in child.names] if resolved == "cellssl" else [resolved]
            for name in names:
                found.append((child.lineno, name, in_function, lines[child.lineno - 1]))
            visit(child, inner)

    visit(tree, False)
    return found


def edges() -> list[tuple[str, str, str, bool, str]]:
    """``(from package, to package, "file:line", inside a function, source line)`` of every import
    between two cellssl packages."""
    out = []
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(REPO)
        module = ".".join(rel.with_suffix("").parts)
        if f.name == "__init__.py":
            module += ".__init__"
        src = unit_of(f)
        for line, name, in_function, text in imports(f.read_text(), module):
            dst = target_unit(name)
            if dst is not None and dst != src:
                out.append((src, dst, f"{rel}:{line}", in_function, text.strip()))
    return out


def violations(found: list[tuple[str, str, str, bool, str]], table: dict[str, set[str]]) -> list[str]:
    """Imports the table does not allow (``cellssl`` itself, the version, is allowed everywhere)."""
    return [f"{where}: {src} imports {dst} ({text})" for src, dst, where, _, text in found
            if dst != "cellssl" and dst not in table.get(src, set())]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_every_import_follows_the_declared_order():
    table = allowed_imports(DOC.read_text())
    found = edges()
    units = {unit_of(f) for f in PACKAGE.rglob("*.py")} - {"cellssl"}
    assert units <= set(table), f"packages missing from {DOC.name}'s table: {sorted(units - set(table))}"
    bad = violations(found, table)
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_no_import_cycle_between_packages():
    table = allowed_imports(DOC.read_text())
    assert find_cycle(table) is None, f"the declared order itself has a cycle: {find_cycle(table)}"
    graph: dict[str, set[str]] = {}
    for src, dst, *_ in edges():
        graph.setdefault(src, set()).add(dst)
    assert find_cycle(graph) is None, f"import cycle between cellssl packages: {' -> '.join(find_cycle(graph))}"


def test_function_level_imports_say_why():
    """Outside the CLI (which imports each command's module inside the command), an import of a
    cellssl module inside a function is there for start-up time only, and its line says so."""
    silent = [f"{where}: {text}" for src, _, where, in_function, text in edges()
              if in_function and src != "cli" and "#" not in text]
    assert not silent, "function-level cellssl imports without a reason:\n" + "\n".join(silent)


def test_the_checker_catches_a_back_edge_a_hidden_import_and_a_cycle():
    """The checks above can fail: a function-level import of eval from data is found and refused,
    and a two-package loop is a cycle."""
    table = allowed_imports(DOC.read_text())
    source = "import numpy\n\ndef read():\n    from cellssl.eval.knn import knn\n    return knn\n"
    found = [("data", target_unit(name), f"x.py:{line}", inner, text)
             for line, name, inner, text in imports(source, "cellssl.data.x") if target_unit(name)]
    assert found == [("data", "eval", "x.py:4", True, "    from cellssl.eval.knn import knn")]
    assert violations(found, table) == ["x.py:4: data imports eval (    from cellssl.eval.knn import knn)"]
    assert target_unit(imports("from .. import eval\n", "cellssl.data.datasets")[0][1]) == "eval"
    assert target_unit(imports("from cellssl import __version__\n", "cellssl.eval.x")[0][1]) == "cellssl"
    assert find_cycle({"eval": {"adapt"}, "adapt": {"eval"}}) == ["adapt", "eval", "adapt"]
    assert find_cycle({"eval": {"engine"}, "engine": {"data"}}) is None


# ---- command modules do not import each other ------------------------------------------------
SHARED_HOMES = {"cellssl.eval.features"}  # `embed`'s module, and the one home of what every evaluation command does
COMMAND_PACKAGES = ("eval", "apply")


def command_modules(cli_source: str) -> set[str]:
    """The modules ``cli.py`` runs as a command: ``from cellssl.X.Y import NAME as run``."""
    return {node.module for node in ast.walk(ast.parse(cli_source))
            if isinstance(node, ast.ImportFrom) and node.module and any(a.asname == "run" for a in node.names)}


def command_cross_imports(commands: set[str], sources: dict[str, str]) -> list[str]:
    """``"A imports B"`` for every command module A of ``eval``/``apply`` (``sources``: dotted name ->
    source) that imports another command module B (the shared homes excepted)."""
    ours = {m for m in commands if m.split(".")[1] in COMMAND_PACKAGES} - SHARED_HOMES
    return [f"{module} imports {name}" for module in sorted(ours & set(sources))
            for _, name, _, _ in imports(sources[module], module) if name in ours - {module}]


def test_command_modules_do_not_import_each_other():
    """A piece two commands share lives in one home beside them (docs/architecture.md), not in one command's module."""
    commands = command_modules((PACKAGE / "cli.py").read_text())
    assert {"cellssl.eval.linear", "cellssl.eval.knn", "cellssl.apply.predict", "cellssl.apply.export"} <= commands
    sources = {".".join(f.relative_to(REPO).with_suffix("").parts): f.read_text()
               for package in COMMAND_PACKAGES for f in (PACKAGE / package).glob("*.py")}
    bad = command_cross_imports(commands, sources)
    assert not bad, "command modules importing each other (move the shared piece to its home):\n" + "\n".join(bad)


def test_the_command_check_catches_one_command_using_another():
    commands = {"cellssl.eval.linear", "cellssl.eval.knn", "cellssl.eval.features", "cellssl.adapt.report"}
    sources = {"cellssl.eval.linear": "from cellssl.eval.knn import train_test_features\n"
                                      "from cellssl.eval.features import FeatureSet\n",
               "cellssl.eval.knn": "def knn():\n    import cellssl.eval.linear as linear\n"}
    assert command_cross_imports(commands, sources) == ["cellssl.eval.knn imports cellssl.eval.linear",
                                                        "cellssl.eval.linear imports cellssl.eval.knn"]


# ---- each package's docstring is its table of contents -----------------------------------------
def docstring_gaps(package: Path) -> list[str]:
    """Modules of ``package`` its ``__init__`` docstring does not name (``cellssl.<pkg>.<module>``),
    and names in it that are no module of the package."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    named = set(re.findall(rf"cellssl\.{package.name}\.(\w+)", doc))
    modules = {f.stem for f in package.glob("*.py")} - {"__init__"}
    return ([f"{package.name}: {m} is not in the docstring" for m in sorted(modules - named)]
            + [f"{package.name}: the docstring names {m}, which is no module" for m in sorted(named - modules)])


def test_each_package_docstring_lists_its_modules():
    """``methods`` excepted: a method is its file alone, and the package imports every module."""
    packages = [p for p in sorted(PACKAGE.iterdir()) if (p / "__init__.py").is_file() and p.name != "methods"]
    assert {"eval", "apply", "engine"} <= {p.name for p in packages}
    gaps = [g for p in packages for g in docstring_gaps(p)]
    assert not gaps, "stale package docstrings:\n" + "\n".join(gaps)
