"""Long-video nodes: Context Windows (Lightning), Video Metrics and Load Image Sequence."""

from __future__ import annotations

import json
import math

import torch
from comfy_api.v0_0_2 import io, ui

from . import image_sequence, specs
from ._core import core
from .comfy_schema import build_schema
from .context_windows import ContextSettings, install


class ContextWindows(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return build_schema(specs.CONTEXT_WINDOWS)

    @classmethod
    def execute(cls, model, context_length, context_overlap, context_schedule, context_stride, closed_loop,
                fuse_method, freenoise=True, max_windows_per_call=0):
        settings = ContextSettings(context_length=context_length, overlap=context_overlap, stride=context_stride,
                                   closed_loop=closed_loop, schedule=context_schedule, fuse_method=fuse_method,
                                   freenoise=freenoise, max_windows_per_call=max_windows_per_call)
        patched = model.clone()
        install(patched, settings)
        return io.NodeOutput(patched)


def _number(value) -> float:
    """A FLOAT output: undefined values (no windows, frames too small for optical flow) become NaN."""
    return float("nan") if value is None or not math.isfinite(value) else float(value)


class VideoMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return build_schema(specs.VIDEO_METRICS, specs.resolve_core_options)

    @classmethod
    def execute(cls, images, flow_method="dis", context_length=16, context_overlap=4,
                context_schedule="standard_static", context_stride=1, closed_loop=False):
        metrics = core("metrics")  # OpenCV: imported here so that Context Windows works without it
        windows = None
        if context_length > 0:
            windows = ContextSettings(context_length=context_length, overlap=context_overlap, stride=context_stride,
                                      closed_loop=closed_loop, schedule=context_schedule).windows(images.shape[0])
        report = metrics.video_metrics(images, windows, flow_method)
        plot = torch.from_numpy(metrics.plot_video_metrics(report)).to(torch.float32).div(255.0).unsqueeze(0)
        seam = report["seam"]["score"] if report["seam"] is not None else None
        return io.NodeOutput(_number(report["flicker"]["mean"]), _number(report["warp"]["mean"]), _number(seam),
                             json.dumps(report), plot, ui=ui.PreviewImage(plot, cls=cls))


class LoadImageSequence(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return build_schema(specs.LOAD_IMAGE_SEQUENCE)

    @classmethod
    def _folder(cls, folder):
        import folder_paths

        return image_sequence.resolve_folder(folder, folder_paths.get_input_directory())

    @classmethod
    def fingerprint_inputs(cls, folder, start=0, count=0, every_nth=1):
        try:
            return image_sequence.fingerprint(cls._folder(folder))
        except Exception:  # a missing folder is reported by execute, with its message
            return float("nan")

    @classmethod
    def execute(cls, folder, start=0, count=0, every_nth=1):
        paths = image_sequence.frame_paths(cls._folder(folder), start, count, every_nth)
        frames = torch.from_numpy(image_sequence.read_frames(paths))
        return io.NodeOutput(frames, len(paths))


NODES = [ContextWindows, VideoMetrics, LoadImageSequence]
