"""Writes the example workflows (ComfyUI UI format) from short Python descriptions.

Run by hand after changing a node's inputs: ``python workflows/_build.py``. Widget values are laid out in each
node's schema order (ours from ``nodes/specs.py``, core nodes' from ``tests/data/comfyui_core_nodes.json``), so
the files always match the nodes; ``tests/test_workflows.py`` checks them in CI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from workflow_tools import offline_schemas  # noqa: E402

SCHEMAS = offline_schemas()


class Workflow:
    def __init__(self, scale: float = 0.75):
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []
        self.scale = scale  # the zoom the frontend opens the workflow at

    def node(self, kind: str, pos, size=(320, 130), *, widgets: dict | None = None, inputs: dict | None = None,
             title: str | None = None, color: str | None = None) -> dict:
        schema = SCHEMAS[kind]
        widgets = dict(widgets or {})
        node = {"id": len(self.nodes) + 1, "type": kind, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": kind}, "widgets_values": []}
        if title:
            node["title"] = title
        if color:
            node["color"], node["bgcolor"] = color, color
        for i, out_type in enumerate(schema.outputs):
            node["outputs"].append({"name": out_type, "type": out_type, "links": [], "slot_index": i})
        for s in schema.inputs:
            if s.widget:
                if s.name not in widgets:
                    raise KeyError(f"{kind}: no value given for widget {s.name!r}")
                node["widgets_values"].append(widgets.pop(s.name))
                if s.control_after_generate:
                    node["widgets_values"].append("fixed")
        if widgets:
            raise KeyError(f"{kind}: unknown widgets {sorted(widgets)}")
        self.nodes.append(node)
        for name, (source, slot) in (inputs or {}).items():
            self.connect(source, slot, node, name)
        return node

    def connect(self, source: dict, slot: int, target: dict, name: str) -> None:
        schema = SCHEMAS[target["type"]].input(name)
        if schema is None:
            raise KeyError(f"{target['type']} has no input {name!r}")
        out_type = source["outputs"][slot]["type"]
        link_id = len(self.links) + 1
        entry = {"name": name, "type": schema.type, "link": link_id}
        if schema.widget:  # a widget fed by a link: the frontend stores it like this and keeps the widget's value
            entry = {"name": name, "type": out_type, "widget": {"name": name}, "link": link_id}
        target["inputs"].append(entry)
        source["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, source["id"], slot, target["id"], len(target["inputs"]) - 1, out_type])

    def note(self, pos, text: str, size=(420, 200)) -> dict:
        node = {"id": len(self.nodes) + 1, "type": "Note", "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                "widgets_values": [text], "color": "#432", "bgcolor": "#653"}
        self.nodes.append(node)
        return node

    def group(self, title: str, bounding, color="#3f789e") -> None:
        self.groups.append({"title": title, "bounding": list(bounding), "color": color, "font_size": 24,
                            "flags": {}})

    def to_json(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": self.scale, "offset": [40, 40]}}, "version": 0.4}

    def save(self, name: str) -> Path:
        path = HERE / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)
        return path


PROMPT = "a girl smiling, wind blowing her hair, cherry blossoms falling, best quality, masterpiece"
NEGATIVE = "worst quality, low quality, watermark, text"


def txt2vid_lightning_4step() -> Workflow:
    w = Workflow()
    ckpt = w.node("CheckpointLoaderSimple", (20, 60), (330, 100),
                  widgets={"ckpt_name": "toonyou_beta6.safetensors"})
    pos = w.node("CLIPTextEncode", (380, 60), (400, 160), widgets={"text": PROMPT}, inputs={"clip": (ckpt, 1)},
                 title="Positive prompt", color="#232")
    neg = w.node("CLIPTextEncode", (380, 260), (400, 130), widgets={"text": NEGATIVE},
                 inputs={"clip": (ckpt, 1)}, title="Negative prompt (used only with cfg > 1)", color="#322")
    latent = w.node("EmptyLatentImage", (380, 430), (400, 110),
                    widgets={"width": 512, "height": 512, "batch_size": 16},
                    title="Video size (batch_size = number of frames)")
    mm = w.node("ADL_LoadMotionModule", (20, 210), (330, 100),
                widgets={"name": "animatediff_lightning_4step_comfyui.safetensors", "group_norm": "per_frame",
                         "lightning_steps": "auto"})
    apply = w.node("ADL_ApplyMotionModule", (20, 370), (330, 100), widgets={"scale": 1.0},
                   inputs={"model": (ckpt, 0), "motion_module": (mm, 0)})
    sampler = w.node("ADL_LightningSampler", (820, 60), (330, 240),
                     widgets={"seed": 42, "steps": 0, "cfg": 1.0, "denoise": 1.0},
                     inputs={"model": (apply, 0), "positive": (pos, 0), "negative": (neg, 0),
                             "latent_image": (latent, 0)})
    decode = w.node("VAEDecode", (820, 380), (330, 50), inputs={"samples": (sampler, 0), "vae": (ckpt, 2)})
    video = w.node("CreateVideo", (1190, 60), (300, 80), widgets={"fps": 8.0}, inputs={"images": (decode, 0)})
    w.node("SaveVideo", (1190, 180), (360, 420),
           widgets={"filename_prefix": "video/lightning_4step", "format": "auto", "codec": "auto"},
           inputs={"video": (video, 0)})
    w.note((20, 520), "AnimateDiff-Lightning, text to video in 4 steps.\n\n"
           "1. Put animatediff_lightning_4step_comfyui.safetensors in models/animatediff_models (or leave it: the "
           "loader downloads it from the Hugging Face hub on first use).\n"
           "2. Pick any SD1.5 checkpoint (ToonYou, epiCRealism, DreamShaper 8...).\n"
           "3. Queue. Steps 0 = the module's own step count, cfg 1.0 = what Lightning was distilled for.\n\n"
           "Longer than 32 frames? Add Context Windows (Lightning) between Apply and the sampler.",
           size=(330, 260))
    return w


VID2VID_PROMPT = "a robot dancing on a neon stage, cyberpunk, highly detailed, best quality, masterpiece"


def vid2vid_pose_controlnet() -> Workflow:
    w = Workflow(scale=0.6)
    # 1. source video: frames, audio and frame rate through ComfyUI's own video nodes
    video = w.node("LoadVideo", (20, 80), (300, 330), widgets={"file": "dance.mp4"}, title="Source video")
    parts = w.node("GetVideoComponents", (340, 80), (280, 90), inputs={"video": (video, 0)})
    frames = w.node("ImageScale", (340, 200), (280, 150),
                    widgets={"upscale_method": "lanczos", "width": 512, "height": 768, "crop": "center"},
                    inputs={"image": (parts, 0)}, title="Frames at SD1.5 size")
    ckpt = w.node("CheckpointLoaderSimple", (20, 580), (330, 100), widgets={"ckpt_name": "toonyou_beta6.safetensors"})
    encode = w.node("VAEEncode", (340, 380), (280, 50), inputs={"pixels": (frames, 0), "vae": (ckpt, 2)})
    w.group("1. Source video", (0, 0, 640, 480))
    # 2. pose frames -> OpenPose ControlNet on both prompts
    pose = w.node("ADL_LoadImageSequence", (680, 80), (300, 170),
                  widgets={"folder": "dance_poses", "start": 0, "count": 0, "every_nth": 1},
                  title="Pose frames (one per source frame)", color="#223")
    cnet = w.node("ControlNetLoader", (1000, 200), (300, 60),
                  widgets={"control_net_name": "control_v11p_sd15_openpose.pth"})
    pos = w.node("CLIPTextEncode", (370, 580), (400, 150), widgets={"text": VID2VID_PROMPT},
                 inputs={"clip": (ckpt, 1)}, title="Positive prompt", color="#232")
    neg = w.node("CLIPTextEncode", (370, 770), (400, 130), widgets={"text": NEGATIVE},
                 inputs={"clip": (ckpt, 1)}, title="Negative prompt (used only with cfg > 1)", color="#322")
    apply_cnet = w.node("ControlNetApplyAdvanced", (1000, 290), (300, 170),
                        widgets={"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0},
                        inputs={"positive": (pos, 0), "negative": (neg, 0), "control_net": (cnet, 0),
                                "image": (pose, 0)})
    w.group("2. Poses (OpenPose ControlNet)", (660, 0, 660, 480), color="#8a6")
    # 3. model: Lightning motion module + context windows for clips longer than 16 frames
    mm = w.node("ADL_LoadMotionModule", (20, 720), (330, 100),
                widgets={"name": "animatediff_lightning_4step_comfyui.safetensors", "group_norm": "per_frame",
                         "lightning_steps": "auto"})
    apply = w.node("ADL_ApplyMotionModule", (20, 880), (330, 100), widgets={"scale": 1.0},
                   inputs={"model": (ckpt, 0), "motion_module": (mm, 0)})
    windows = w.node("ADL_ContextWindows", (800, 580), (320, 300),
                     widgets={"context_length": 16, "context_overlap": 4, "context_schedule": "standard_static",
                              "context_stride": 1, "closed_loop": False, "fuse_method": "pyramid",
                              "freenoise": True, "max_windows_per_call": 0},
                     inputs={"model": (apply, 0)})
    w.group("3. Model, prompts, context windows", (0, 500, 1320, 500), color="#a1309b")
    # 4. sample at a denoise on the 4-step grid, decode, save with the source's audio and frame rate
    sampler = w.node("ADL_LightningSampler", (1360, 80), (330, 260),
                     widgets={"seed": 42, "steps": 0, "cfg": 1.0, "denoise": 0.75},
                     inputs={"model": (windows, 0), "positive": (apply_cnet, 0), "negative": (apply_cnet, 1),
                             "latent_image": (encode, 0)})
    decode = w.node("VAEDecode", (1360, 380), (330, 50), inputs={"samples": (sampler, 0), "vae": (ckpt, 2)})
    create = w.node("CreateVideo", (1360, 460), (330, 100), widgets={"fps": 30.0},
                    inputs={"images": (decode, 0), "fps": (parts, 2), "audio": (parts, 1)},
                    title="Create Video (source fps and audio)")
    w.node("SaveVideo", (1720, 80), (400, 480),
           widgets={"filename_prefix": "video/lightning_vid2vid", "format": "auto", "codec": "auto"},
           inputs={"video": (create, 0)})
    w.node("ADL_VideoMetrics", (1720, 620), (400, 330),
           widgets={"flow_method": "dis", "context_length": 16, "context_overlap": 4,
                    "context_schedule": "standard_static", "context_stride": 1, "closed_loop": False},
           inputs={"images": (decode, 0)})
    w.group("4. Sample, save, check seams", (1340, 0, 800, 1000), color="#b58b2a")
    w.note((1360, 600), "Video to video with OpenPose, any length.\n\n"
           "Source: pick it in Source video; size in Frames at SD1.5 size.\n\n"
           "Poses, one per source frame: a folder of pose images (ComfyUI/input/dance_poses, loaded in name "
           "order), or, with comfyui_controlnet_aux installed, feed Frames at SD1.5 size through its DWPose "
           "Estimator into Apply ControlNet's image instead (DWPose downloads its own weights on first use). "
           "Needs control_v11p_sd15_openpose.pth in models/controlnet.\n\n"
           "Context Windows: 16-frame windows, overlap 4; each window's ControlNet sees its own poses.\n\n"
           "denoise 0.75 = 3 of the 4 Lightning steps (0.5 keeps more of the source). Output keeps the source's "
           "fps and audio. Try a few frames first: Image From Batch after both frame outputs (same settings).",
           size=(330, 380))
    return w


WORKFLOWS = {"txt2vid_lightning_4step": txt2vid_lightning_4step, "vid2vid_pose_controlnet": vid2vid_pose_controlnet}


def main() -> None:
    for name, build in WORKFLOWS.items():
        print(build().save(name))


if __name__ == "__main__":
    main()
