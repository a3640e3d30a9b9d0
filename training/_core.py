"""The pack's core modules for ``training/``, imported the right way round (same idea as ``nodes/_core.py``).

Inside ComfyUI the repository is one package (``<pack>.training`` next to ``<pack>.lightning``) and a top-level
``lightning`` may well be PyTorch Lightning, which training environments often have installed. So modules of
``training/`` never write ``import lightning``: they ask ``core("distill")`` (``core("toy.models")`` for a
subpackage), which resolves to this pack's own core in both layouts. In a checkout (``python -m training``,
tests) the core is the top-level ``lightning``; ``training/__init__.py`` makes sure that name is ours there.
"""

import importlib

_PACKAGE_PREFIX = __package__.rpartition(".")[0] + "." if "." in (__package__ or "") else ""


def pack_module(name: str):
    """A module of this pack by its path in the repository (``nodes.placement``, ``training.dataset``), whether
    the pack is imported as top-level packages (a checkout) or as one package inside ComfyUI's ``custom_nodes``."""
    return importlib.import_module(_PACKAGE_PREFIX + name)


def core(name: str):
    """``lightning.<name>`` of this pack, e.g. ``core("distill")``."""
    return pack_module(f"lightning.{name}")
