"""OpenCV without choosing its distribution for the user.

OpenCV's ``cv2`` module is published as four PyPI distributions (``opencv-python``, ``opencv-python-headless``
and their ``-contrib`` twins) that all install the same ``cv2`` folder. pip cannot express "any one of them":
listing one in ``requirements.txt`` installs it beside whichever the environment already has, two
distributions then own one folder, and uninstalling either later deletes files the other still needs.
ComfyUI environments usually have one variant already (other node packs bring it), so the pack lists none
and asks for ``cv2`` only where it is used, with a message that says how to get exactly one.
"""

from __future__ import annotations

import importlib
from importlib import metadata

from .errors import LightningError

#: Every PyPI distribution that installs the ``cv2`` module.
DISTRIBUTIONS = ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless", "opencv-contrib-python")

#: What to install when none is present: no GUI libraries (libGL) needed, so it works on servers and in CI.
RECOMMENDED = "opencv-python-headless"


class MissingOpenCVError(LightningError, ImportError):
    """``cv2`` cannot be imported; the message says which distribution to install or repair."""


def installed_distributions() -> list[str]:
    """The OpenCV distributions pip has recorded in this environment (any of ``DISTRIBUTIONS``)."""
    found = []
    for name in DISTRIBUTIONS:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def require_cv2(feature: str = "this feature"):
    """Import and return ``cv2``, or raise :class:`MissingOpenCVError` naming the fix for this environment."""
    try:
        return importlib.import_module("cv2")
    except ImportError as exc:
        raise MissingOpenCVError(_message(feature, exc, installed_distributions())) from exc


def _message(feature: str, exc: ImportError, installed: list[str]) -> str:
    head = f"[AnimateDiff-Lightning] {feature} needs OpenCV (the cv2 module), which cannot be imported ({exc})."
    if len(installed) > 1:
        return (f"{head} Several OpenCV distributions are installed ({', '.join(installed)}) and share one cv2 "
                f"folder, so removing one broke the others. Uninstall all of them, then install one: "
                f"python -m pip uninstall -y {' '.join(installed)} && python -m pip install {RECOMMENDED}")
    if installed:
        return (f"{head} {installed[0]} is installed but its cv2 does not load; reinstall it with "
                f"python -m pip install --force-reinstall {installed[0]}"
                + (f" (or, on a machine without a display, replace it with {RECOMMENDED})"
                   if installed[0] in ("opencv-python", "opencv-contrib-python") else ""))
    return (f"{head} Install exactly one OpenCV distribution into ComfyUI's Python: "
            f"python -m pip install {RECOMMENDED} (or opencv-python if you want its GUI functions). "
            f"Do not install one when another variant ({', '.join(DISTRIBUTIONS)}) is already there.")
