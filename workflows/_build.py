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
    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

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
        target["inputs"].append({"name": name, "type": schema.type, "link": link_id})
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
                "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}}, "version": 0.4}

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
                    widgets={"width": 512, "height": 512, "batch_size": 16}, title="16 frames at 512x512")
    mm = w.node("ADL_LoadMotionModule", (20, 210), (330, 100),
                widgets={"name": "animatediff_lightning_4step_comfyui.safetensors", "group_norm": "per_frame"})
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


WORKFLOWS = {"txt2vid_lightning_4step": txt2vid_lightning_4step}


def main() -> None:
    for name, build in WORKFLOWS.items():
        print(build().save(name))


if __name__ == "__main__":
    main()
