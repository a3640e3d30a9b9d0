"""A folder of frames (pose renders, exported video frames) read in the order people number them.

ComfyUI core's folder loader lists files in directory order, which scrambles ``pose_10.png`` before
``pose_2.png`` on most file systems; a vid2vid ControlNet then gets its poses shuffled. Here names are sorted
naturally (digit runs compare as numbers). Plain Python + OpenCV, tested in CI.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ._core import core

errors = core("errors")
_frames = core("frames")  # natural order and image decoding, shared with the training dataset builder
log = logging.getLogger(__name__)

IMAGE_SUFFIXES = _frames.IMAGE_SUFFIXES
natural_key = _frames.natural_key


def resolve_folder(folder: str, input_dir: str | os.PathLike) -> Path:
    path = Path(os.path.expanduser(folder.strip()))
    if not path.is_absolute():
        path = Path(input_dir) / path
    if not path.is_dir():
        raise errors.InvalidInputError(
            f"Load Image Sequence: {path} is not a folder. Give a folder of frames, absolute or relative to "
            f"ComfyUI's input folder ({input_dir}).")
    return path


def frame_paths(folder: Path, start: int = 0, count: int = 0, every_nth: int = 1) -> list[Path]:
    """Image files of ``folder`` in natural name order, from ``start``, every ``every_nth``, at most ``count``."""
    if start < 0 or count < 0 or every_nth < 1:
        raise errors.InvalidInputError(f"Load Image Sequence: start ({start}) and count ({count}) must be >= 0 and "
                                       f"every_nth ({every_nth}) >= 1")
    files = _frames.image_files(folder)
    chosen = files[start::every_nth]
    if count:
        chosen = chosen[:count]
    if not chosen:
        raise errors.InvalidInputError(
            f"Load Image Sequence: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder} from frame {start} with "
            f"every_nth {every_nth}; it holds {len(files)} image(s).")
    return chosen


def read_frames(paths: list[Path]) -> np.ndarray:
    """``[F, H, W, 3]`` float32 RGB in 0..1 (ComfyUI's IMAGE layout); every frame resized to the first's size."""
    import cv2

    frames, size = [], None
    for path in paths:
        image = _frames.read_image(path, who="Load Image Sequence")
        if size is None:
            size = (image.shape[1], image.shape[0])
        elif (image.shape[1], image.shape[0]) != size:
            log.warning("[AnimateDiff-Lightning] %s is %dx%d, resized to the first frame's %dx%d", path.name,
                        image.shape[1], image.shape[0], *size)
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        frames.append(image)
    return np.stack(frames)


def fingerprint(folder: Path) -> str:
    """Changes whenever a frame is added, removed, renamed or rewritten, so ComfyUI reloads the folder."""
    entries = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file())
    return repr(entries)
