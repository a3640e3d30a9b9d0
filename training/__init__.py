"""Running distillation stages: datasets, the stage loop, checkpoints and DDP.

The math of a stage lives in the core's ``lightning.distill``; this package drives it on real data and hardware.
"""


def _own_core_first() -> None:
    """Top-level ``training`` (a checkout): make the top-level name ``lightning`` resolve to this repository's core.

    PyTorch Lightning installs a top-level package called ``lightning`` too. When this package is imported as
    ``<pack>.training`` (inside ComfyUI) the core is ``<pack>.lightning`` and nothing here applies. As the
    top-level ``training`` the core must be the ``lightning`` next to it: put the repository root first on
    ``sys.path`` when another ``lightning`` would be found first, and refuse clearly when a foreign one has
    already been imported (one process cannot hold two top-level modules of one name).
    """
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours = os.path.join(root, "lightning")

    def is_ours(path) -> bool:
        return path is not None and os.path.normcase(os.path.realpath(path)).startswith(
            os.path.normcase(os.path.realpath(ours)) + os.sep)

    loaded = sys.modules.get("lightning")
    if loaded is not None:
        if not is_ours(getattr(loaded, "__file__", None)):
            where = getattr(loaded, "__file__", None) or "a namespace package"
            raise ImportError(
                f"a different package named 'lightning' ({where}) was imported before this repository's "
                f"training package; its core is {ours}. Import 'training' before PyTorch Lightning, or run "
                "'python -m training' from the repository root in a fresh process.")
        return
    spec = importlib.util.find_spec("lightning")
    if spec is None or not is_ours(spec.origin):
        sys.path.insert(0, root)
        importlib.invalidate_caches()


if "." not in __name__:
    _own_core_first()
