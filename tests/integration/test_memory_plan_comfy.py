"""On a real ComfyUI: the memory plan traces ComfyUI's own UNet for a GPU run at 512x512, adversarial phases
included.

Imported on a machine without a GPU, ComfyUI picks its sub-quadratic attention, whose chunking reads tensor
values that fake tensors do not have; a plan for a CUDA device traces with the attention ComfyUI uses on
NVIDIA GPUs instead (``training.comfy_backend.attention_of_nvidia_gpus``) and must not fall back to the
stand-in. The plan is run in ComfyUI's Python, as the nodes and the CLI there run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from comfy_harness import REPO, comfyui_path, comfyui_python, fixture_dir
from fixture_files import fixture_models
from graphs import LIGHTNING_4STEP

pytestmark = pytest.mark.integration

PLAN = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from training import config as cfg, memory
    from training.comfy_backend import import_comfy

    config = cfg.Config()
    config.model.kind = "sd15"
    config.model.bases = sys.argv[1:3]
    config.model.teacher = sys.argv[3]
    config.model.resident_bases = "one"
    config.model.gradient_checkpointing = True
    config.run.device = "cuda"
    config.run.precision = "bf16"
    config.stage.name = "8->4"
    config.discriminator.trainable = "light"
    config.discriminator.gradient_checkpointing = True
    geometry = memory.Geometry.from_pixels(8, 512, 512)
    plan = memory.estimate(config, free_bytes=1 << 45, geometry=geometry, search=False)
    from comfy.ldm.modules import attention
    print(json.dumps({"source": plan.model_source, "remarks": plan.remarks, "phase": plan.phase,
                      "peak": plan.peak_bytes,
                      "weights": plan.breakdown["frozen weights"] + plan.breakdown["trainable weights"],
                      "attention_restored": attention.optimized_attention is not attention.attention_pytorch}))
""")


def test_a_gpu_plan_at_512_traces_comfyuis_unet_in_both_adversarial_phases():
    models = fixture_models()
    (first,) = models["checkpoints"].values()
    teacher = models["animatediff_models"][LIGHTNING_4STEP]
    second = fixture_dir() / "sd15_random_seed1.safetensors"
    if not second.exists():
        from lightning.testing import sd15

        sd15.write_sd15_checkpoint(second, seed=1)
    proc = subprocess.run([comfyui_python(comfyui_path()), "-c", PLAN, str(first), str(second), str(teacher)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))
    assert result["source"].startswith("ComfyUI's SD1.5 UNet"), result
    assert not any("stand-in" in r for r in result["remarks"]), result["remarks"]
    assert result["phase"] in ("conditional", "unconditional")
    # weights alone (bf16 base, fp32 teacher, student, light D) are about 6.8 GiB; the iteration adds to them
    assert result["weights"] > 6 * 2**30 and result["peak"] > result["weights"], result
    # ComfyUI's own choice is back once the plan is made (a plan must not change how ComfyUI samples)
    assert result["attention_restored"]
