"""The pack's core modules, imported the right way round.

ComfyUI imports the repository as one package (``<pack>.nodes`` next to ``<pack>.lightning``), so inside ComfyUI
the core is a sibling package; never a top-level ``lightning``, which may be PyTorch Lightning in the same
environment. Tests and scripts import ``nodes`` from a checkout with the repository root on ``sys.path``, where
the core is the top-level ``lightning``. Each node module asks only for the core modules it uses, so a missing
optional library (OpenCV for the metrics, say) cannot take the other nodes down with it.
"""

import importlib

_PACKAGE_PREFIX = __package__.rpartition(".")[0] + "." if "." in (__package__ or "") else ""


def core(name: str):
    """``lightning.<name>`` of this pack, e.g. ``core("sampling")``."""
    return importlib.import_module(f"{_PACKAGE_PREFIX}lightning.{name}")
