"""benchmarks/ is a package: each script runs as ``python -m benchmarks.<name>``, none edits
``sys.path``, and what several of them use lives in ``benchmarks/common.py`` (a script never
imports another script, except the quality benchmark's cross-lab columns, ``benchmarks.crosslab``)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common, cpu_speed
from conftest import REPO, make_image_folder

SCRIPTS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if p.name != "__init__.py")
NAMES = {p.stem for p in SCRIPTS}
SHARED = {"common", "crosslab"}  # the modules a benchmark may import from another


def _imported_modules(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return out


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_benchmark_imports_only_the_shared_modules_and_never_edits_sys_path(script: Path) -> None:
    tree = ast.parse(script.read_text())
    path_edits = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
                  and isinstance(n.value, ast.Name) and n.value.id == "sys"]
    assert not path_edits, f"{script.name} uses sys.path at lines {path_edits}"
    mods = _imported_modules(tree)
    bare = [m for m in mods if m.split(".")[0] in NAMES]  # `import quality`: only works with a path hack
    assert not bare, f"{script.name} imports {bare} outside the benchmarks package"
    others = {m.split(".")[1] for m in mods if m.startswith("benchmarks.") and m.split(".")[1] in NAMES}
    assert others <= SHARED, f"{script.name} imports the scripts {sorted(others - SHARED)}: move it to common.py"


def test_every_benchmark_imports_as_a_module_of_the_package() -> None:
    before = list(sys.path)
    for name in sorted(NAMES):
        importlib.import_module(f"benchmarks.{name}")
    assert sys.path == before


def test_quality_runs_as_a_module_and_its_help_loads_no_torch(tmp_path: Path) -> None:
    code = "import sys, runpy; sys.argv = ['q', '--help']\ntry:\n runpy.run_module('benchmarks.quality', " \
           "run_name='__main__')\nexcept SystemExit:\n pass\nassert 'torch' not in sys.modules, 'torch loaded'"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cpu_speed.child_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "python -m benchmarks.quality --quick" in done.stdout


def test_cpu_speed_child_finds_the_package_from_any_folder(tmp_path: Path) -> None:
    # what `python -m benchmarks.cpu_speed --one ...` resolves first, without importing torch for it
    code = "import importlib.util as u; assert u.find_spec('benchmarks.cpu_speed').origin.endswith('cpu_speed.py')"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cpu_speed.child_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_command_line_is_the_module_command_quoted_for_a_shell() -> None:
    assert common.command_line("quality", ["--rows", "MSBReg,VICReg", "--variant", "strong colour=x.yaml"]) == (
        "python -m benchmarks.quality --rows MSBReg,VICReg --variant 'strong colour=x.yaml'")


def test_write_markdown_keeps_the_hand_written_analysis(tmp_path: Path) -> None:
    md = tmp_path / "r.md"
    common.write_markdown(md, ["# old", "table 1"])
    md.write_text(md.read_text() + "\n## Analysis\n\nwritten by hand\n")
    common.write_markdown(md, ["# new", "table 2"])
    assert md.read_text() == "# new\ntable 2\n## Analysis\n\nwritten by hand\n"


def test_a_missing_data_folder_is_one_line_naming_it_and_the_option(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=rf"^error: no PBC data at {tmp_path / 'nope'}; pass --data"):
        common.require_folder(tmp_path / "nope", "PBC data")
    assert common.require_folder(tmp_path, "PBC data") == tmp_path


def test_run_alone_notice_names_the_cores() -> None:
    assert "CPU cores" in common.run_alone_notice()


def test_make_split_is_fixed_stratified_and_reused(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "src", n_per_class=10, size=8, classes=("a", "b"))
    parts = common.make_split(src, tmp_path / "split")
    counts = {k: sorted(len(list((v / c).iterdir())) for c in ("a", "b")) for k, v in parts.items()}
    assert counts == {"pretrain": [7, 7], "val": [1, 1], "test": [2, 2]}
    again = common.make_split(src, tmp_path / "split2")
    names = [sorted(p.name for p in (x["test"] / "a").iterdir()) for x in (parts, again)]
    assert names[0] == names[1]
