"""Every ``from .module import name`` inside ``nodes/`` names something that module defines.

The node modules import ComfyUI, so CI cannot import them; a name that moved between modules (a merge that
renamed a key, say) would only show up as "IMPORT FAILED" in a real ComfyUI. This reads the sources instead.
"""

import ast
from pathlib import Path

import pytest

NODES = Path(__file__).resolve().parents[1] / "nodes"


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def relative_imports():
    for path in sorted(NODES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                target = NODES / f"{node.module.replace('.', '/')}.py"
                for alias in node.names:
                    yield pytest.param(path.name, target, alias.name, id=f"{path.stem}:{node.module}.{alias.name}")


@pytest.mark.parametrize("source, target, name", list(relative_imports()))
def test_relative_import_names_exist(source, target, name):
    assert target.exists(), f"nodes/{source} imports from missing {target.name}"
    assert name in top_level_names(target), f"nodes/{source} imports {name!r}, which {target.name} does not define"


def test_the_check_catches_a_moved_name(tmp_path):
    (tmp_path / "a.py").write_text("KEY = 1\nfrom .b import thing\ndef f():\n    pass\n")
    assert top_level_names(tmp_path / "a.py") == {"KEY", "thing", "f"}
    assert "OPTIONS_KEY" not in top_level_names(tmp_path / "a.py")
