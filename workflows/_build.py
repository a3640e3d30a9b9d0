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


# --- distilling your own Lightning module -------------------------------------------------------------------

TRAIN_PROMPTS = ("a cat walking on a wall\nwaves breaking on a beach\na girl smiling, wind in her hair\n"
                 "a car driving through a city at night\nfireworks over a lake")


def _stage_widgets(stage: str, iterations: int, run_name: str, *, validate_every: int = 50) -> dict:
    return {"stage": stage, "iterations": iterations, "run_name": run_name, "resume": "latest", "seed": 0,
            "learning_rate": 0.0, "clips": 1, "precision": "auto", "gradient_checkpointing": True,
            "discriminator": "light", "resident_bases": "auto", "save_every": 25, "validate_every": validate_every,
            "validation_prompts": "a cat walking on a wall", "mse_only": False, "memory_budget_gb": 0.0,
            "optimizer": "adam"}


def _bases(w: Workflow, x: int, y: int, names=("toonyou_beta6.safetensors", "epicrealism_naturalSinRC1VAE.safetensors")):
    previous = None
    for i, name in enumerate(names):
        node = w.node("ADL_TrainingBases", (x, y + 110 * i), (330, 80), widgets={"ckpt_name": name},
                      inputs={"bases": (previous, 0)} if previous else None, title=f"Base {i + 1}")
        previous = node
    return previous


def distill_quickstart() -> Workflow:
    w = Workflow(scale=0.65)
    teacher = w.node("ADL_LoadMotionModule", (20, 60), (330, 100),
                     widgets={"name": "animatediff_lightning_8step_comfyui.safetensors", "group_norm": "per_frame", "lightning_steps": "auto"},
                     title="Teacher: the released 8-step module")
    bases = _bases(w, 20, 200)
    dataset = w.node("ADL_TrainingDataset", (380, 60), (360, 420),
                     widgets={"source": "teacher", "prompts": TRAIN_PROMPTS, "video_folder": "training_videos",
                              "clips_per_base": 8, "frames": 16, "width": 256, "height": 256, "seed": 0,
                              "name": "quickstart", "stride": 1, "clips_per_video": 1, "teacher_steps": 0},
                     inputs={"bases": (bases, 0), "teacher": (teacher, 0)})
    stage = w.node("ADL_DistillStage", (770, 60), (420, 720), widgets=_stage_widgets("8->4", 100, "my_lightning"),
                   inputs={"teacher": (teacher, 0), "bases": (bases, 0), "dataset": (dataset, 0)},
                   title="Distill 8 -> 4 steps on your bases")
    w.group("1. Distil (runs for a while: watch the curves; Cancel keeps everything)", (0, 0, 1210, 800))
    ckpt = w.node("CheckpointLoaderSimple", (1240, 60), (330, 100), widgets={"ckpt_name": "toonyou_beta6.safetensors"})
    pos = w.node("CLIPTextEncode", (1240, 200), (330, 130), widgets={"text": PROMPT}, inputs={"clip": (ckpt, 1)},
                 title="Positive prompt", color="#232")
    neg = w.node("CLIPTextEncode", (1240, 370), (330, 100), widgets={"text": NEGATIVE}, inputs={"clip": (ckpt, 1)},
                 title="Negative prompt", color="#322")
    latent = w.node("EmptyLatentImage", (1240, 510), (330, 110), widgets={"width": 512, "height": 512, "batch_size": 16})
    reference = w.node("ADL_LoadMotionModule", (1240, 660), (330, 100),
                       widgets={"name": "animatediff_lightning_4step_comfyui.safetensors", "group_norm": "per_frame", "lightning_steps": "auto"},
                       title="Released 4-step module, for comparison")
    for row, (module, title) in enumerate(((stage, "Your student, 4 steps"), (reference, "Released 4-step"))):
        y = 60 + row * 420
        apply = w.node("ADL_ApplyMotionModule", (1600, y), (300, 100), widgets={"scale": 1.0},
                       inputs={"model": (ckpt, 0), "motion_module": (module, 0)}, title=title)
        sampler = w.node("ADL_LightningSampler", (1600, y + 140), (300, 240),
                         widgets={"seed": 42, "steps": 0, "cfg": 1.0, "denoise": 1.0},
                         inputs={"model": (apply, 0), "positive": (pos, 0), "negative": (neg, 0),
                                 "latent_image": (latent, 0)})
        decode = w.node("VAEDecode", (1930, y), (300, 50), inputs={"samples": (sampler, 0), "vae": (ckpt, 2)})
        video = w.node("CreateVideo", (1930, y + 80), (300, 80), widgets={"fps": 8.0}, inputs={"images": (decode, 0)})
        w.node("SaveVideo", (2260, y), (360, 380),
               widgets={"filename_prefix": f"video/{'student' if row == 0 else 'released'}_4step", "format": "auto",
                        "codec": "auto"}, inputs={"video": (video, 0)})
    w.group("2. Sample with the student beside the released module", (1220, 0, 1420, 880), color="#8a6")
    w.note((20, 480), "Distil your own Lightning module on your style checkpoints.\n\n"
           "1. Bases: one Training Bases node per SD1.5 checkpoint (chain them).\n"
           "2. Dataset: the teacher makes 8 clips per base from the prompts (cached under "
           "models/adlightning_datasets; queueing again adds only what is missing).\n"
           "3. Distill Stage: 8 -> 4 steps, 2 x 100 iterations. The widget draws loss, D accuracy and preference "
           "live. Cancel saves everything; resume = latest continues exactly.\n\n"
           "The student lands in models/animatediff_models as my_lightning_4step.safetensors.", size=(330, 300))
    return w


def distill_progressive() -> Workflow:
    w = Workflow(scale=0.55)
    teacher = w.node("ADL_LoadMotionModule", (20, 60), (330, 100),
                     widgets={"name": "mm_sd_v15_v2.ckpt", "group_norm": "per_frame", "lightning_steps": "auto"}, title="AnimateDiff v2 (teacher)")
    bases = _bases(w, 20, 200)
    dataset = w.node("ADL_TrainingDataset", (20, 460), (360, 420),
                     widgets={"source": "teacher", "prompts": TRAIN_PROMPTS, "video_folder": "training_videos",
                              "clips_per_base": 64, "frames": 16, "width": 256, "height": 256, "seed": 0,
                              "name": "progressive", "stride": 1, "clips_per_video": 1, "teacher_steps": 0},
                     inputs={"bases": (bases, 0), "teacher": (teacher, 0)})
    ckpt = w.node("CheckpointLoaderSimple", (20, 920), (330, 100), widgets={"ckpt_name": "toonyou_beta6.safetensors"})
    pos = w.node("CLIPTextEncode", (20, 1060), (330, 130), widgets={"text": PROMPT}, inputs={"clip": (ckpt, 1)},
                 title="Validation prompt", color="#232")
    latent = w.node("EmptyLatentImage", (20, 1230), (330, 110), widgets={"width": 256, "height": 256, "batch_size": 16})
    previous = teacher
    for i, (stage_name, steps) in enumerate((("32->8", 8), ("8->4", 4), ("4->2", 2))):
        x = 420 + i * 520
        stage = w.node("ADL_DistillStage", (x, 60), (440, 720),
                       widgets=_stage_widgets(stage_name, 500, f"my_lightning_s{i + 1}", validate_every=100),
                       inputs={"teacher": (previous, 0), "bases": (bases, 0), "dataset": (dataset, 0)},
                       title=("First", "Second", "Third")[i] + " stage")
        apply = w.node("ADL_ApplyMotionModule", (x, 820), (300, 100), widgets={"scale": 1.0},
                       inputs={"model": (ckpt, 0), "motion_module": (stage, 0)}, title=f"{steps}-step student")
        sampler = w.node("ADL_LightningSampler", (x, 960), (300, 240),
                         widgets={"seed": 42, "steps": 0, "cfg": 1.0, "denoise": 1.0},
                         inputs={"model": (apply, 0), "positive": (pos, 0), "negative": (pos, 0),
                                 "latent_image": (latent, 0)})
        decode = w.node("VAEDecode", (x, 1240), (300, 50), inputs={"samples": (sampler, 0), "vae": (ckpt, 2)})
        w.node("PreviewImage", (x + 320, 820), (200, 400), inputs={"images": (decode, 0)},
               title=f"Student of the {('first', 'second', 'third')[i]} stage")
        previous = stage
    w.group("The paper's chain: 128 -> 32 -> 8 -> 4 -> 2 (here from 32 -> 8; each stage's student teaches the next)",
            (400, 0, 1580, 1320))
    w.note((420, 1330), "Progressive distillation. A 128 -> 32 MSE stage (stage '128->32 mse+cfg') comes first when "
           "the teacher is a plain AnimateDiff module; here the chain starts from a 32-step teacher. Each stage "
           "saves <run_name>_<N>step.safetensors into animatediff_models and validates after every 100 iterations "
           "(the widget and the Preview Image of its samples). Queue once: the stages run in order; a Cancel in any "
           "stage is resumed by queueing again (resume = latest on every stage).", size=(900, 160))
    return w


def discriminator_preview() -> Workflow:
    w = Workflow(scale=0.75)
    ckpt = w.node("CheckpointLoaderSimple", (20, 60), (330, 100), widgets={"ckpt_name": "toonyou_beta6.safetensors"})
    mm = w.node("ADL_LoadMotionModule", (20, 200), (330, 100),
                widgets={"name": "my_lightning_4step.safetensors", "group_norm": "per_frame", "lightning_steps": "auto"}, title="Your student")
    apply = w.node("ADL_ApplyMotionModule", (20, 340), (330, 100), widgets={"scale": 1.0},
                   inputs={"model": (ckpt, 0), "motion_module": (mm, 0)})
    pos = w.node("CLIPTextEncode", (380, 60), (360, 130), widgets={"text": PROMPT}, inputs={"clip": (ckpt, 1)},
                 title="Prompt", color="#232")
    latent = w.node("EmptyLatentImage", (380, 230), (360, 110), widgets={"width": 256, "height": 256, "batch_size": 16},
                    title="The run's size and frames")
    preview = w.node("ADL_DiscriminatorPreview", (780, 60), (340, 220),
                     widgets={"run": "my_lightning-20260101-120000", "seed": 42, "steps": 0, "base_index": 0},
                     inputs={"model": (apply, 0), "positive": (pos, 0), "latent_image": (latent, 0)})
    w.node("PreviewImage", (1150, 60), (420, 300), inputs={"images": (preview, 0)}, title="P(teacher) per jump")
    w.node("PreviewImage", (1150, 400), (420, 420), inputs={"images": (preview, 2)}, title="Where D looks, per frame")
    w.note((20, 480), "Which steps and frames does the student still get wrong?\n\n"
           "Pick a run of an adversarial stage (it saved a discriminator), apply its student to a base, and queue. "
           "Per jump the plot shows D's probability that the jump is the teacher's: for the student's jump (blue) "
           "and for the teacher's own jump from the same noisy latent (orange). Close bars = the student has "
           "caught up at that step. The saliency frames show in red where D's decision comes from.",
           size=(720, 220))
    return w


WORKFLOWS.update({"distill_quickstart": distill_quickstart, "distill_progressive": distill_progressive,
                  "discriminator_preview": discriminator_preview})


def main() -> None:
    for name, build in WORKFLOWS.items():
        print(build().save(name))


if __name__ == "__main__":
    main()
