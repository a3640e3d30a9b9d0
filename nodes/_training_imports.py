"""The pack's ``training`` package for the training nodes, imported the right way round (as ``nodes/_core.py``
does for the core): ``<pack>.training`` inside ComfyUI, the top-level ``training`` in a checkout. ``training/``
reaches the core through its own ``_core``, so nothing here touches the top-level name ``lightning``, which may
belong to PyTorch Lightning."""

from __future__ import annotations

import importlib

_PACKAGE_PREFIX = __package__.rpartition(".")[0] + "." if "." in (__package__ or "") else ""


def training(name: str):
    """``training.<name>`` of this pack, e.g. ``training("loop")``."""
    return importlib.import_module(f"{_PACKAGE_PREFIX}training.{name}")
