"""Training clips from a folder of captioned videos.

The folder holds videos (mp4, webm, mov, mkv, avi, m4v; decoded by OpenCV) and/or sub-folders of frames (read
in natural name order: ``frame_2`` before ``frame_10``), each with a caption: ``walk.mp4`` -> ``walk.txt``,
``walk/`` -> ``walk.txt`` beside it. Every problem is found before anything is encoded and reported together:
a video without caption (naming the ``.txt`` it needs), an empty caption, a video OpenCV cannot decode, a video
too short for one clip at the stride, an empty folder.

A clip takes every ``stride``-th frame, ``frames`` of them. Each frame is centre-cropped to the training aspect
ratio (the largest centred window) and resized to ``width x height`` (area averaging when shrinking). One clip
per video starts at its first frame; ``clips_per_video = c`` spreads ``c`` clips evenly over the video (first
and last possible start included), ``0`` takes every non-overlapping clip. Latents are encoded once with base 0's
VAE (SD1.5 VAEs share one latent space); captions are encoded with every base's text encoder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ._core import core
InvalidInputError = core("errors").InvalidInputError
require_cv2 = core("opencv").require_cv2
image_files = core("frames").image_files
natural_key = core("frames").natural_key
read_image = core("frames").read_image

from .dataset import (BuildReport, CacheWriter, _describe, _encode_one, as_bases, check_sizes, complete_conditioning,
                      source_key)

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")


@dataclasses.dataclass
class Video:
    path: Path  # a video file or a folder of frames
    name: str  # relative to the video folder: the clip's identity in the cache
    caption: str
    frame_count: int
    bytes: int

    @property
    def is_frame_folder(self) -> bool:
        return self.path.is_dir()


def caption_path(video: Path) -> Path:
    return video.with_suffix(".txt") if video.is_file() else video.with_name(video.name + ".txt")


def _open(path: Path):
    cv2 = require_cv2("the video dataset builder")

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        return None
    return capture


def count_frames(path: Path) -> int | None:
    """Frames OpenCV can decode from a video file; None when it cannot decode the first one."""
    cv2 = require_cv2("the video dataset builder")

    capture = _open(path)
    if capture is None:
        return None
    try:
        if not capture.read()[0]:
            return None
        reported = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if reported > 0:  # containers usually know; when they do not (some webm), count by decoding
            return reported
        count = 1
        while capture.grab():
            count += 1
        return count
    finally:
        capture.release()


def clip_span(frames: int, stride: int) -> int:
    """Source frames one clip covers."""
    return (frames - 1) * stride + 1


def clip_starts(frame_count: int, frames: int, stride: int, clips_per_video: int) -> list[int]:
    last = frame_count - clip_span(frames, stride)
    if last < 0:
        return []
    if clips_per_video == 0:
        return list(range(0, last + 1, clip_span(frames, stride)))
    count = min(clips_per_video, last + 1)
    if count == 1:
        return [0]
    return [last * i // (count - 1) for i in range(count)]


def scan_folder(folder: str | os.PathLike, *, frames: int, stride: int) -> list[Video]:
    """The captioned videos of ``folder``, in natural name order; raises one error listing every problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"the video folder {folder} does not exist or is not a folder")
    candidates = sorted((p for p in folder.iterdir() if not p.name.startswith(".")
                         and ((p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES) or p.is_dir())),
                        key=lambda p: natural_key(p.name))
    if not candidates:
        raise InvalidInputError(
            f"the video folder {folder} has no videos ({', '.join(VIDEO_SUFFIXES)}) and no sub-folders of frames; "
            "put clips there, each with a same-name .txt caption (walk.mp4 + walk.txt)")
    span = clip_span(frames, stride)
    videos, problems = [], []
    for path in candidates:
        caption_file = caption_path(path)
        caption = None
        if not caption_file.is_file():
            problems.append(f"{path.name} has no caption: write its prompt into {caption_file.name} beside it")
        else:
            caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
            if not caption:
                problems.append(f"the caption {caption_file.name} of {path.name} is empty: write the clip's prompt")
        if path.is_dir():
            files = image_files(path)
            count, size = len(files), sum(f.stat().st_size for f in files)
            if not files:
                problems.append(f"the frame folder {path.name} has no images; remove it or fill it with frames")
                continue
        else:
            count, size = count_frames(path), path.stat().st_size
            if count is None:
                problems.append(f"{path.name} cannot be decoded by OpenCV (an unsupported codec or a broken file): "
                                "convert it to H.264 mp4, or export its frames to a folder")
                continue
        if count < span:
            problems.append(f"{path.name} has {count} frames; one clip of {frames} frames at stride {stride} needs "
                            f"{span}: lower the stride or the frames, or remove the video")
            continue
        if caption:
            videos.append(Video(path, path.name, caption, count, size))
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise InvalidInputError(f"the video folder {folder} cannot be used as it is ({len(problems)} problem"
                                f"{'s' if len(problems) > 1 else ''}):\n{listed}")
    return videos


def crop_and_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The largest centred window of the target aspect ratio, resized to ``width x height``."""
    cv2 = require_cv2("the video dataset builder")

    h, w = image.shape[:2]
    if w * height > h * width:  # wider than the target: crop the sides
        crop = h * width // height
        left = (w - crop) // 2
        image = image[:, left:left + crop]
    else:
        crop = w * height // width
        top = (h - crop) // 2
        image = image[top:top + crop]
    if image.shape[:2] == (height, width):
        return np.ascontiguousarray(image)
    shrink = image.shape[1] > width
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _decoded_frames(video: Video, wanted: set[int], width: int, height: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB float32 frame at the training size) for the wanted indices, in order, as far as they exist."""
    cv2 = require_cv2("the video dataset builder")

    if video.is_frame_folder:
        files = image_files(video.path)
        for index in sorted(wanted):
            if index < len(files):
                yield index, crop_and_resize(read_image(files[index], who=video.name), width, height)
        return
    capture = _open(video.path)
    if capture is None:
        raise InvalidInputError(f"{video.path} cannot be opened by OpenCV any more")
    try:
        for index in range(max(wanted) + 1):
            if index in wanted:
                ok, frame = capture.read()
                if not ok:
                    return
                frame = crop_and_resize(frame, width, height)
                yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
            elif not capture.grab():
                return
    finally:
        capture.release()


def read_clips(video: Video, starts: Sequence[int], *, frames: int, stride: int, width: int,
               height: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, ``[frames, height, width, 3]`` float32 RGB in 0..1) per start, decoding the video once.

    Frames are kept only until the last clip that needs them has been yielded, so long videos stream.
    """
    starts = sorted(starts)
    indices = {s: [s + j * stride for j in range(frames)] for s in starts}
    wanted = {i for members in indices.values() for i in members}
    held: dict[int, np.ndarray] = {}
    pending = list(starts)
    for index, frame in _decoded_frames(video, wanted, width, height):
        held[index] = frame
        while pending and indices[pending[0]][-1] <= index:
            start = pending.pop(0)
            yield start, np.stack([held[i] for i in indices[start]])
            keep_from = pending[0] if pending else index + 1
            for old in [i for i in held if i < keep_from]:
                del held[old]


def build_from_videos(path: str | os.PathLike, folder: str | os.PathLike, *, bases: Sequence,
                      encode_images: Callable[[int, torch.Tensor], torch.Tensor],
                      encode_text: Callable[[int, list[str]], torch.Tensor], frames: int = 16, width: int = 256,
                      height: int = 256, stride: int = 1, clips_per_video: int = 1, dtype: str = "float16",
                      shard_clips: int = 32, progress: Callable[[int, int], None] | None = None,
                      check_cancel: Callable[[], None] | None = None) -> BuildReport:
    """Add the clips of a folder of captioned videos to the dataset at ``path`` (created when absent).

    ``encode_images(base, frames [F, H, W, 3] in 0..1) -> [F, 4, H/8, W/8]`` in x0 space (called with base 0),
    ``encode_text(base, prompts) -> [len(prompts), tokens, dim]``. Clips already cached are skipped (a source
    video whose caption or size changed since is refused). ``progress(done, total)`` is called after every
    added clip (total: clips this build adds); ``check_cancel()`` is called between clips and may raise to
    stop: the finished clips stay in the cache.
    """
    check_sizes(frames, width, height)
    for name, value, low in (("stride", stride, 1), ("clips_per_video", clips_per_video, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")
    bases = as_bases(bases)
    videos = scan_folder(folder, frames=frames, stride=stride)
    check_cancel = check_cancel or (lambda: None)
    with CacheWriter(path, frames=frames, width=width, height=height, bases=bases, dtype=dtype,
                     shard_clips=shard_clips) as writer:
        plan, skipped = [], 0
        for video in videos:
            missing = []
            for start in clip_starts(video.frame_count, frames, stride, clips_per_video):
                source = dict(kind="video", path=video.name, start=start, stride=stride, prompt=video.caption,
                              bytes=video.bytes, video_frames=video.frame_count, folder=str(Path(folder).resolve()))
                held = writer._keys.get(source_key(source))
                if held is None:
                    missing.append(source)
                    continue
                if (held["source"]["prompt"], held["source"]["bytes"]) != (video.caption, video.bytes):
                    raise InvalidInputError(
                        f"{video.name} or its caption changed since {_describe(held['source'])} was cached; the "
                        "cache keeps what it encoded. Build into a dataset with another name, or restore the file")
                skipped += 1
            if missing:
                plan.append((video, missing))
        total = sum(len(m) for _, m in plan)
        if progress is not None:
            progress(0, total)
        conditioning_added = complete_conditioning(writer, encode_text, check_cancel)
        done = 0
        for video, missing in plan:
            check_cancel()
            conds = {b: _encode_one(encode_text, b, video.caption) for b in range(len(writer.manifest["bases"]))}
            by_start = {s["start"]: s for s in missing}
            produced = 0
            for start, pixels in read_clips(video, list(by_start), frames=frames, stride=stride, width=width,
                                            height=height):
                check_cancel()
                latents = encode_images(0, torch.from_numpy(pixels))
                writer.add_clip(by_start[start], None, latents, conds)
                produced += 1
                done += 1
                if progress is not None:
                    progress(done, total)
            if produced < len(missing):
                # The container promised more frames than it holds; what it has is kept.
                log.warning("[AnimateDiff-Lightning] %s decoded fewer frames than its header says; %d of %d clips "
                            "taken from it", video.path, produced, len(missing))
                if produced == 0:
                    raise InvalidInputError(
                        f"{video.path} decodes to fewer frames than one clip of {frames} at stride {stride} needs "
                        f"({clip_span(frames, stride)}): lower the stride or the frames, or remove the video")
        return BuildReport(Path(path), done, skipped, writer.clip_count, conditioning_added)
