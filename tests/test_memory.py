"""The memory plan (training.memory): traced estimate vs the real CPU allocator, breakdown, refusal with options
that really fit, and no real weights allocated while planning."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning.testing.sd15 import sd15_unet_shapes
from training import memory, sd15_standin

ROOT = Path(__file__).resolve().parents[1]
# Narrow stand-in (two UNet levels, attention on the first) so a trace takes seconds.
TINY = memory.StandIn(model_channels=16, channel_mult=(1, 2), heads=2, groups=8, context_dim=16, tokens=4,
                      motion_heads=2, attention_levels=(0,))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_standin_unet_has_sd15_keys_and_shapes():
    with torch.device("meta"):
        unet = sd15_standin.StandInUNet()
    assert {k: tuple(v.shape) for k, v in unet.state_dict().items()} == sd15_unet_shapes()


@pytest.mark.slow
@pytest.mark.parametrize("kind, geometry", [
    ("mse", memory.Geometry(2, 8, 8)),
    ("mse", memory.Geometry(4, 16, 16)),
    ("conditional", memory.Geometry(4, 8, 16)),
])
def test_estimate_is_within_20_percent_of_the_real_cpu_peak(kind, geometry):
    settings = memory.PlanSettings(stage="2->1", device="cpu", mse_only=kind == "mse")
    traced = memory.trace_iteration(*memory.plan_pieces(settings, geometry, kind, "cpu", TINY))
    real = memory.measure_real_peak(*memory.plan_pieces(settings, geometry, kind, "cpu", TINY))
    assert 0.8 <= traced.peak_bytes / real <= 1.2, (traced.peak_bytes, real)
    # the parts are the peak's, and each kind of memory the iteration has shows up
    assert sum(traced.breakdown.values()) == traced.peak_bytes
    for part in ("frozen weights", "trainable weights", "optimizer state", "activations"):
        assert traced.breakdown[part] > 0, part


@pytest.mark.slow  # a dozen traces: minutes on two busy cores
def test_plan_refuses_with_options_that_fit_when_re_estimated():
    settings = memory.PlanSettings(stage="2->1", mse_only=True, device="cuda", clips=2, micro_batch=2)
    geometry = memory.Geometry(4, 16, 16)
    roomy = memory.estimate(None, free_bytes=1 << 40, geometry=geometry, standin=TINY, settings=settings)
    assert roomy.fits and not roomy.options_that_fit
    parts = roomy.breakdown
    assert sum(parts.values()) == roomy.peak_bytes
    assert parts["CUDA context + libraries (by hand)"] == memory.CUDA_CONTEXT_BYTES
    # leave room for the context but not for the whole iteration
    free = roomy.peak_bytes - int(0.15 * roomy.traced_bytes)
    plan = memory.estimate(None, free_bytes=free, geometry=geometry, standin=TINY, settings=settings)
    assert not plan.fits
    assert plan.options_that_fit, plan.table()
    with pytest.raises(memory.MemoryPlanError) as refused:
        plan.check()
    for option in plan.options_that_fit:
        assert " ".join(f"--set {o}" for o in option.overrides) in str(refused.value)
        changed = settings
        for override in option.overrides:
            changed = changed.with_override(override)
        again = memory.estimate(None, free_bytes=free, geometry=geometry, standin=TINY, settings=changed,
                                search=False)
        assert again.fits and again.peak_bytes == option.peak_bytes, option


@pytest.mark.slow  # one full-size trace in a fresh process
def test_planning_the_full_size_model_allocates_no_real_weights():
    # SD1.5 UNet + motion module + teacher in fp32 would be about 6.9 GB; the trace runs in a fresh process so
    # its high-water RSS is the plan's own.
    code = (
        "import json, resource, torch; torch.set_num_threads(1)\n"
        "from training import memory\n"
        "s = memory.PlanSettings(stage='2->1', mse_only=True, device='cuda', precision='fp32')\n"
        "plan = memory.estimate(None, free_bytes=1 << 40, geometry=memory.Geometry(2, 8, 8), settings=s)\n"
        "print(json.dumps({'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,"
        " 'weights': plan.breakdown['frozen weights'] + plan.breakdown['trainable weights'],"
        " 'source': plan.model_source}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["weights"] > 5e9  # the plan did count the full-size weights...
    assert result["rss"] < 1.5e9  # ...without ever holding them
    assert "stand-in" in result["source"]


def test_overrides_parse_and_name_their_config_keys():
    s = memory.PlanSettings()
    s = s.with_override("model.gradient_checkpointing=true").with_override("stage.micro_batch=2")
    assert s.checkpointing is True and s.micro_batch == 2
    assert s.override_string("d_trainable") == "discriminator.trainable=full"
    with pytest.raises(memory.InvalidInputError, match="stage.micro_batch"):
        s.with_override("stage.batch=3")


def test_without_comfyui_or_readable_files_the_plan_says_why_it_traces_the_stand_in(tmp_path, monkeypatch):
    from training import config as cfg

    config = cfg.Config()
    assert memory.ComfyModels.from_config(config, "cpu") == (None, "no model.bases / model.teacher to read")
    config.model.bases = [str(tmp_path / "a.safetensors")]
    config.model.teacher = str(tmp_path / "mm.ckpt")
    models, why = memory.ComfyModels.from_config(config, "cpu")
    assert models is None and "mm.ckpt is not a .safetensors file" in why
    config.model.teacher = str(tmp_path / "mm.safetensors")
    models, why = memory.ComfyModels.from_config(config, "cpu")
    assert models is None and why == f"{tmp_path / 'a.safetensors'} does not exist"
    for name in ("a.safetensors", "mm.safetensors"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    models, why = memory.ComfyModels.from_config(config, "cpu")
    assert models is None and why.startswith("ComfyUI is not importable here")


def test_a_comfyui_trace_that_reads_tensor_values_falls_back_to_the_stand_in(monkeypatch):
    from torch._subclasses.fake_tensor import DataDependentOutputException

    def untraceable(*args, **kwargs):
        def build():
            raise DataDependentOutputException(torch.ops.aten._local_scalar_dense.default)
        return build

    monkeypatch.setattr(memory.ComfyModels, "from_config",
                        classmethod(lambda cls, config, device: (cls(["a"], "t"), "")))
    monkeypatch.setattr(memory, "_comfy_parts", untraceable)
    settings = memory.PlanSettings(stage="2->1", mse_only=True, device="cpu")
    plan = memory.estimate(object(), geometry=memory.Geometry(2, 8, 8), settings=settings, search=False)
    assert plan.model_source.startswith("stand-in")
    assert any("reads tensor values" in r for r in plan.remarks)


def test_the_full_size_stand_in_is_built_by_the_runs_rules():
    # what the run holds (training.sd15_setup / training.loop): D's head at the SD1.5 head width, the teacher in
    # float32 whatever the compute dtype, gradient checkpointing on the student's motion modules only
    from lightning.discriminator import SD15_HEAD_CHANNELS
    from lightning.motion_module import TemporalTransformer

    settings = memory.PlanSettings(stage="8->4", device="cuda", precision="bf16", checkpointing=True,
                                   d_trainable="light")
    modules = memory._standin_parts(memory.StandIn(), settings, memory.Geometry.from_pixels(16, 512, 512),
                                    "conditional", "cuda")()
    assert {p.dtype for p in modules["teacher"].parameters()} == {torch.float32}
    head_convs = [m for m in modules["discriminator"].head.modules() if isinstance(m, torch.nn.Conv3d)]
    assert head_convs and all(m.out_channels <= SD15_HEAD_CHANNELS for m in head_convs[:-1])
    transformers = [m for m in modules["student"].modules() if isinstance(m, TemporalTransformer)]
    assert transformers and all("forward" in m.__dict__ for m in transformers)  # checkpointed forward
    assert not modules["base0"].gradient_checkpointing
    trainable = sum(p.numel() for p in modules["discriminator"].parameters() if p.requires_grad)
    assert trainable < 400e6, trainable  # motion modules, embeddings and the 512-wide head; not a 1.3 G head
