"""On a real ComfyUI: distillation on SD1.5 lanes built from ComfyUI's own UNet.

Two different random full-size SD1.5 checkpoints are the two bases, 64x64 pixels, 8 frames, on the CPU:
a teacher-generated dataset of 2 clips per base (the AnimateDiff teacher through our Apply Motion Module patch
and ComfyUI's dpmpp_2m at CFG 7.5), then 2 MSE iterations of 128->32 with CFG 7.5 and 2 adversarial
iterations of 8->4 with the conditional discriminator. Losses are finite, the student changes, both bases'
weights stay bit-identical to their files, and the saved student loads in our loader and in
AnimateDiff-Evolved. The training itself runs in ComfyUI's Python (``sd15_training_driver.py``).

Full-size SD1.5 on a CPU is slow and large: with one base in memory at a time (``resident_bases = "one"``)
the MSE run peaks near 13 GB and the adversarial run (light discriminator) near 17 GB of RAM; set
``OMP_NUM_THREADS=1`` on a busy machine. ``ADL_SD15_TEACHER_STEPS`` (default 32, the paper's) lowers the
teacher's steps for the dataset when time is short; the seconds per iteration are printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from comfy_harness import REPO, comfyui_path, comfyui_python, fixture_dir
from graphs import SD15, base, ksampler, save_latent

pytestmark = pytest.mark.integration

SECOND_BASE = "sd15_random_seed1.safetensors"
TEACHER = "animatediff_lightning_4step_comfyui.safetensors"
DRIVER = Path(__file__).with_name("sd15_training_driver.py")
RESULTS: dict = {}


def second_base() -> Path:
    from lightning.testing import sd15

    path = fixture_dir() / SECOND_BASE
    if not path.exists():
        sd15.write_sd15_checkpoint(path, seed=1)
    return path


def drive(work: Path, *training_args, teacher_steps: int | None = None, timeout: float = 6 * 3600) -> dict:
    """``python -m training <training_args>`` in ComfyUI's Python, watched by the driver (see its docstring)."""
    extra = ["--teacher-steps", str(teacher_steps)] if teacher_steps else []
    command = [comfyui_python(comfyui_path()), str(DRIVER), "cli", "--work", str(work), *extra, "--",
               *map(str, training_args)]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"result"')][-1]["result"]
    assert result["exit"] == 0, proc.stderr[-6000:]
    print(f"python -m training {' '.join(map(str, training_args[:2]))}: {time.perf_counter() - started:.0f} s")
    return result


def config(work: Path, name: str, stage: str, teacher, bases, dataset) -> Path:
    quoted = ", ".join(json.dumps(str(b)) for b in bases)
    path = work / f"{name}.toml"
    path.write_text(f"""
[run]
name = "{name}"
runs_dir = {json.dumps(str(work / "runs"))}
device = "cpu"
threads = 1

[model]
kind = "sd15"
teacher = {json.dumps(str(teacher))}
bases = [{quoted}]
resident_bases = "one"

[stage]
name = "{stage}"
iterations = 2
clips = 1

[discriminator]
trainable = "light"

[data]
dataset = {json.dumps(str(dataset))}

[checkpoint]
every = 0

[validation]
every = 0
""")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from fixture_files import fixture_models

    models = fixture_models()
    bases = [models["checkpoints"][SD15], second_base()]
    teacher = models["animatediff_models"][TEACHER]
    return tmp_path_factory.mktemp("sd15_training"), bases, teacher


def test_teacher_dataset_then_mse_and_adversarial_iterations_on_two_bases(work):
    from lightning.checkpoints import load_motion_module
    from lightning.testing.sd15 import sd15_unet_shapes
    from training.dataset import LatentDataset

    folder, bases, teacher = work
    prompts = folder / "prompts.txt"
    prompts.write_text("a cat walking on a wall\nwaves breaking on a beach\n")
    dataset = folder / "dataset"
    steps = int(os.environ.get("ADL_SD15_TEACHER_STEPS", "32"))
    drive(folder, "dataset", "teacher", dataset, "--prompts", prompts, "--motion-module", teacher,
          "--clips-per-base", 2, *[a for b in bases for a in ("--checkpoint", b)], "--frames", 8, "--width", 64,
          "--height", 64, teacher_steps=steps)
    data = LatentDataset(dataset)
    assert (data.num_bases, data.frames, data.height, data.width) == (2, 8, 8, 8)

    mse = drive(folder, "run", config(folder, "mse", "128->32", teacher, bases, dataset))
    assert len(mse["students"]) == 1 and mse["students"][0].endswith("mse_32step.safetensors")
    adversarial = drive(folder, "run", config(folder, "adv", "8->4", mse["students"][0], bases, dataset))
    student = [s for s in adversarial["students"] if s.endswith("adv_4step.safetensors")]
    assert len(student) == 1

    unet_weights = len(sd15_unet_shapes())
    for result, phases in ((mse, ["mse"] * 2), (adversarial, ["conditional"] * 2 + ["unconditional"] * 2)):
        assert [r["phase"] for r in result["records"]] == phases and result["finite"]
        assert result["bases"] == {str(i): {"checked": unet_weights, "mismatched": 0, "grads": 0} for i in (0, 1)}
        print(", ".join(f"{r['stage']} {r['phase']} {r['seconds']:.0f} s" for r in result["records"]))
    start, distilled = load_motion_module(teacher), load_motion_module(student[0])
    changed = max(float((distilled.state_dict()[k].float() - v.float()).abs().max())
                  for k, v in start.state_dict().items())
    assert changed > 0, "the student moved away from the teacher"
    RESULTS["student"] = Path(student[0])


def test_the_student_loads_in_animatediff_evolved(comfy, evolved_available):
    student = RESULTS.get("student")
    if student is None:
        pytest.skip("the training test did not produce a student")
    name = "adl_trained_student.safetensors"
    link = comfy.base / "models" / "animatediff_models" / name
    if not link.exists():
        link.symlink_to(student)
    graph = base(frames=8)
    graph["ade"] = {"class_type": "ADE_AnimateDiffLoaderGen1", "inputs": {
        "model": ["ckpt", 0], "model_name": name, "beta_schedule": "sqrt_linear (AnimateDiff)"}}
    video = comfy.latent(comfy.run(save_latent(ksampler(graph, model=("ade", 0), steps=1), "adl/trained")), "save")
    assert video.shape == (8, 4, 8, 8) and bool(torch.isfinite(video).all())
