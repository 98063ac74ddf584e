"""Data flows one way: target -> engine -> store -> views, and the command line on top.

The library packages (capture, store, stream, fs) never import the command line, and no
command drives another through ``cli.main`` (argv strings); they call library functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "snapfs"
LIBRARY = ("capture", "elfcore", "store", "stream", "fs")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


@pytest.mark.parametrize("package", LIBRARY)
def test_library_packages_do_not_import_the_command_line(package):
    bad = {
        str(p.relative_to(ROOT)): sorted(m for m in _imports(p)
                                         if m.startswith(("snapfs.commands", "snapfs.cli")))
        for p in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_commands_call_library_entry_points_not_cli_main():
    users = [str(p.relative_to(ROOT)) for p in (ROOT / "commands").glob("*.py")
             if any(m.startswith("snapfs.cli") for m in _imports(p))]
    assert users == []
