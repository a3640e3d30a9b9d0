"""PyTorch Lightning's top-level ``lightning`` package must not shadow this pack's core (a training environment often has it).

A stand-in package named ``lightning`` is put first on the path of a fresh interpreter; the CLI, ``training``'s
modules and (in the ComfyUI layout, the repository imported as one package) the nodes must still reach our core.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ``python -S``: no site hooks, so an editable install of this project (whose finder maps the name
# ``lightning`` to a checkout) cannot hide a wrong import; torch and friends come from the same folders.
SITE = [Path(p) for p in site.getsitepackages()]


@pytest.fixture
def foreign(tmp_path):
    """A folder holding a package called ``lightning`` that is not ours (as PyTorch Lightning's would be)."""
    package = tmp_path / "site" / "lightning"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("FOREIGN = True\n__version__ = '2.99.0'\n")
    return package.parent


def _env(path: list[Path]) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, path + SITE)), OMP_NUM_THREADS="1")


def _python(code: str, *, path: list[Path], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(code)], cwd=cwd, env=_env(path),
                          capture_output=True, text=True, timeout=120)


def test_training_finds_our_core_when_a_foreign_lightning_comes_first(foreign, tmp_path):
    result = _python(f"""
        import training
        from training import distributed
        from training._core import core
        import lightning, sys
        assert not hasattr(lightning, "FOREIGN"), lightning.__file__
        assert core("distill").__file__.startswith({str(REPO)!r}), core("distill").__file__
        assert distributed.errors.__name__ == "lightning.errors"
        print("ok")
        """, path=[foreign, REPO], cwd=tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_cli_runs_with_a_foreign_lightning_first_on_the_path(foreign, tmp_path):
    result = subprocess.run([sys.executable, "-S", "-m", "training", "run", "--help"], cwd=tmp_path,
                            env=_env([foreign, REPO]), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "config" in result.stdout


def test_a_foreign_lightning_imported_first_is_refused_clearly(foreign, tmp_path):
    result = _python("""
        import lightning
        import training
        """, path=[foreign, REPO], cwd=tmp_path)
    assert result.returncode != 0
    assert "a different package named 'lightning'" in result.stderr
    assert str(foreign / "lightning") in result.stderr


def _pack(tmp_path) -> Path:
    """``custom_nodes/adlightning_pack`` -> this checkout, as ComfyUI would see the pack."""
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "adlightning_pack").symlink_to(REPO, target_is_directory=True)
    return custom_nodes


def test_inside_comfyui_the_pack_uses_its_own_core_beside_a_foreign_lightning(foreign, tmp_path):
    # ComfyUI imports custom_nodes/<pack> as one package; a top-level lightning (PyTorch Lightning) may coexist
    custom_nodes = _pack(tmp_path)
    result = _python("""
        import lightning
        assert lightning.FOREIGN
        import adlightning_pack.nodes._core as nodes_core
        import adlightning_pack.training._core as training_core
        from adlightning_pack.training import distributed
        assert nodes_core.core("schedule").__name__ == "adlightning_pack.lightning.schedule"
        assert training_core.core("distill").__name__ == "adlightning_pack.lightning.distill"
        assert training_core.core("toy.models").__name__ == "adlightning_pack.lightning.toy.models"
        assert distributed.errors.__name__ == "adlightning_pack.lightning.errors"
        import sys
        assert sys.modules["lightning"].FOREIGN  # untouched
        print("ok")
        """, path=[foreign, custom_nodes], cwd=tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


TRAINING_MODULES = sorted(p.stem for p in (REPO / "training").glob("*.py")
                          if p.stem not in ("__init__", "__main__", "comfy_backend", "sd15_setup"))


def test_every_training_module_imports_in_the_pack_beside_a_foreign_lightning(foreign, tmp_path):
    custom_nodes = _pack(tmp_path)
    result = _python(f"""
        import importlib, lightning, sys
        for name in {TRAINING_MODULES!r}:
            importlib.import_module("adlightning_pack.training." + name)
        leaked = sorted(m for m in sys.modules if m.startswith("lightning."))
        assert not leaked, leaked
        print("ok")
        """, path=[foreign, custom_nodes], cwd=tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
