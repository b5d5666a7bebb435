"""The package's layering holds: the import-linter contracts in pyproject.toml (each package
imports only those below it; the commands reach the engine only through the API, reports and
file formats) and no import cycle between any two modules."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import grimp
import networkx as nx

ROOT = Path(__file__).resolve().parent.parent


def test_import_linter_contracts_are_kept():
    lint = Path(sysconfig.get_path("scripts")) / "lint-imports"
    proc = subprocess.run(
        [str(lint), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("einplan", include_external_packages=False, cache_dir=None)
    edges = nx.DiGraph(
        (m, t) for m in graph.modules for t in graph.find_modules_directly_imported_by(m)
    )
    assert list(nx.simple_cycles(edges)) == []


def test_importing_the_compiler_loads_no_runtime():
    code = "import sys, einplan.compiler.ops; print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = [m for m in eval(out.stdout) if m.startswith("einplan.")]
    assert loaded and not [
        m
        for m in loaded
        if not m.startswith(("einplan.compiler", "einplan._version", "einplan.errors"))
    ]
