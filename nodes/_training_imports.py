"""The ``training`` package of this pack, importable inside ComfyUI.

Inside ComfyUI the repository is one package (``<pack>.training`` next to ``<pack>.lightning``). Some modules of
``training/`` still import the core as the top-level ``lightning`` (``from lightning import distill``), which
only resolves in a checkout. Until they import it through the pack, the training nodes register the pack's
``lightning`` package and its submodules under the top-level name - the same module objects, so classes compare
equal whichever way they were imported - and only when no other top-level ``lightning`` (PyTorch Lightning)
is installed; with one installed the training nodes refuse to load rather than shadow it.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys

_PACKAGE_PREFIX = __package__.rpartition(".")[0] + "." if "." in (__package__ or "") else ""


class CoreNameTaken(ImportError):
    """Another package owns the top-level name ``lightning`` in this environment."""


def _alias_core() -> None:
    if not _PACKAGE_PREFIX:
        return  # a checkout: the top-level lightning is ours
    ours = importlib.import_module(_PACKAGE_PREFIX + "lightning")
    present = sys.modules.get("lightning")
    if present is None and importlib.util.find_spec("lightning") is not None:
        raise CoreNameTaken("the training nodes need the top-level name 'lightning', which another package "
                            "(PyTorch Lightning?) owns in this Python environment")
    if present is not None and present is not ours:
        raise CoreNameTaken(f"the top-level module 'lightning' is {getattr(present, '__file__', present)!r}, not "
                            "this pack's core")
    sys.modules["lightning"] = ours
    full = _PACKAGE_PREFIX + "lightning."
    for info in pkgutil.walk_packages(ours.__path__, full):
        try:
            module = importlib.import_module(info.name)
        except Exception:  # an optional dependency of one module must not stop the others
            continue
        sys.modules.setdefault("lightning." + info.name[len(full):], module)


def _alias_training() -> None:
    """``importlib.util.find_spec("training.<x>")`` (``training.memory`` asks it) imports the top-level parent
    ``training``; give it this pack's package when no other top-level ``training`` exists."""
    if not _PACKAGE_PREFIX or "training" in sys.modules:
        return
    if importlib.util.find_spec("training") is None:
        sys.modules["training"] = importlib.import_module(_PACKAGE_PREFIX + "training")


def training(name: str):
    """``training.<name>`` of this pack, e.g. ``training("loop")``."""
    _alias_core()
    _alias_training()
    return importlib.import_module(f"{_PACKAGE_PREFIX}training.{name}")
