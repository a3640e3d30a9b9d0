"""Folders of frames read in the order people number them, as RGB in 0..1.

A plain directory listing puts ``pose_10.png`` before ``pose_2.png`` on most file systems; a clip read that
way has its frames shuffled. Names are sorted naturally here (digit runs compare as numbers). Shared by the
Load Image Sequence node and the training dataset builder (frame folders as videos). Plain Python + OpenCV.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .errors import InvalidInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, in natural name order."""
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                  key=lambda p: natural_key(p.name))


def read_image(path: Path, *, who: str = "") -> np.ndarray:
    """``[H, W, 3]`` float32 RGB in 0..1 from 8- or 16-bit, grey, RGB or RGBA files (alpha dropped)."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InvalidInputError(f"{who + ': ' if who else ''}{path} is not a readable image")
    scale = 65535.0 if image.dtype == np.uint16 else 255.0
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    else:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image.astype(np.float32) / scale
