"""SD1.5 lanes and the discriminator backbone (training.sd15_unet, training.comfy_backend) without ComfyUI:
on a tiny UNet with SD1.5's block structure and ComfyUI's calling conventions (tests/fake_sd15_unet.py).
The same properties are checked on the real ComfyUI UNet by tests/integration/test_training_sd15.py."""

import copy
import json
import struct

import pytest
import torch

from fake_sd15_unet import CALLS, FakeUNet
from lightning import distill
from lightning.discriminator import FlowDiscriminator
from lightning.motion_module import MotionModuleSet, TemporalTransformer
from lightning.testing import sd15 as sd15_fixture
from lightning.testing.motion import randomised
from training import comfy_backend, sd15_setup
from training.sd15_unet import SD15Base, UNetEncoderBackbone, middle_feature_size

CHANNELS = (32, 32, 64, 64)
FRAMES = 4


def motion(seed):
    return randomised(MotionModuleSet(CHANNELS, pe_length=8), seed)


def inputs(clips=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(clips * FRAMES, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 499.0]).repeat_interleave(FRAMES)[: clips * FRAMES]
    cond = torch.randn(clips, 5, 16, generator=g)
    return x, t, cond


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny kernels: a second OpenMP thread only waits, and on a busy machine waits very long
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def unet():
    return FakeUNet(CHANNELS)


def test_base_runs_the_motion_module_at_the_apply_nodes_places_and_takes_it_out_again(unet):
    base = SD15Base(0, unet, CALLS)
    teacher = motion(1)
    x, t, cond = inputs()
    eps = base(x, t, cond, teacher)
    assert not any(isinstance(m, TemporalTransformer) for m in unet.modules()), "the module stays out of the base"
    assert not any(k for k in base.state_dict() if "temporal" in k)
    # the same as a UNet that holds the module for good, called with per-frame context
    from nodes.placement import MotionInjection

    reference = copy.deepcopy(unet)
    MotionInjection.for_module_set(teacher).inject(reference)
    options = {"patches": {"forward_timestep_embed_patch": [(TemporalTransformer, CALLS.motion_handler)]},
               "adl_video_length": FRAMES, "adl_motion_options": {"scale": 1.0}}
    expected = reference(x, t, cond.repeat_interleave(FRAMES, 0), options)
    assert torch.equal(eps, expected)
    # and the motion module matters: frames of a clip see each other
    assert (eps - base(x, t, cond, None)).abs().max() > 1e-3


def test_teacher_and_student_alternate_per_call_with_gradients_only_into_the_student(unet):
    base = SD15Base(0, unet, CALLS)
    teacher, student = motion(1), motion(2)
    x, t, cond = inputs()
    with torch.no_grad():
        first = base(x, t, cond, teacher)
    loss = base(x, t, cond, student).square().mean()
    loss.backward()
    with torch.no_grad():
        again = base(x, t, cond, teacher)
    assert torch.equal(first, again)
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in unet.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_base_expands_per_clip_conditioning_and_refuses_a_mismatch(unet):
    base = SD15Base(0, unet, CALLS)
    x, t, cond = inputs(clips=2)
    both = base(x, t, cond, motion(1))
    one = base(x[:FRAMES], t[:FRAMES], cond[:1], motion(1))
    assert torch.allclose(both[:FRAMES], one, atol=1e-5)
    with pytest.raises(ValueError, match="clips"):
        base(x, t, torch.randn(3, 5, 16), None)
    with pytest.raises(ValueError, match="conditioning"):
        base(x, t, None, None)


def test_lazy_base_reads_weights_on_first_use_and_replays_conversions(unet):
    loads = []

    def load():
        loads.append(1)
        return copy.deepcopy(unet)

    base = SD15Base(3, None, CALLS, load=load)
    base.to(torch.float64)
    assert not loads and not base.loaded
    x, t, cond = inputs(clips=1)
    eps = base(x.double(), t, cond.double(), None)
    assert loads == [1] and eps.dtype == torch.float64
    assert next(base.unet.parameters()).dtype == torch.float64
    base.unload()
    assert not base.loaded
    base(x.double(), t, cond.double(), None)
    assert len(loads) == 2


def test_backbone_reproduces_the_full_forwards_middle_output(unet):
    base = SD15Base(0, unet, CALLS)
    teacher = motion(1)
    x, t, cond = inputs()
    captured = {}
    hook = unet.middle_block[-1].register_forward_hook(lambda m, i, o: captured.setdefault("mid", o.detach()))
    with torch.no_grad():
        base(x, t, cond, teacher)
    hook.remove()
    backbone = UNetEncoderBackbone(unet, teacher, CALLS)
    with torch.no_grad():
        mid = backbone(x, t, cond, torch.zeros(x.shape[0], backbone.embedding_dim), FRAMES)
        shifted = backbone(x, t, cond, torch.ones(x.shape[0], backbone.embedding_dim), FRAMES)
    assert torch.equal(mid, captured["mid"])
    assert (shifted - mid).abs().max() > 1e-4, "the extra embedding reaches the features"
    assert mid.shape[1:] == (backbone.channels, 1, 1) and backbone.embedding_dim == 4 * CHANNELS[0]
    # a copy: training it leaves the base and the teacher alone
    assert all(p.data_ptr() != q.data_ptr() for p in backbone.parameters() for q in unet.parameters())
    assert len(backbone.motion_modules()) == 9  # 8 down + mid


def test_light_backbone_trains_motion_modules_and_time_embedding_only(unet):
    teacher = motion(1)
    full = UNetEncoderBackbone(unet, teacher, CALLS, trainable="full")
    light = UNetEncoderBackbone(unet, teacher, CALLS, trainable="light")
    assert all(p.requires_grad for p in full.parameters())
    trained = {n for n, p in light.named_parameters() if p.requires_grad}
    motion_params = {n for n, p in light.named_parameters() if ".temporal_transformer." in n}
    assert motion_params and motion_params <= trained
    assert {n for n in trained - motion_params} == {n for n, _ in light.time_embed.named_parameters(prefix="time_embed")}
    with pytest.raises(ValueError, match="light"):
        UNetEncoderBackbone(unet, teacher, CALLS, trainable="half")


def test_backbone_gradient_checkpointing_gives_the_same_gradients(unet):
    teacher = motion(1)
    x, t, cond = inputs(clips=1)
    grads = []
    for checkpointing in (False, True):
        backbone = UNetEncoderBackbone(unet, teacher, CALLS)
        backbone.gradient_checkpointing = checkpointing
        backbone(x, t, cond, torch.zeros(x.shape[0], backbone.embedding_dim), FRAMES).square().mean().backward()
        grads.append([p.grad.clone() for p in backbone.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(*grads))


def test_discriminators_judge_clips_of_any_base_from_the_base_and_teacher(unet):
    teacher = motion(1)
    base = SD15Base(0, unet, CALLS)
    make = sd15_setup.discriminator_factory(base, teacher, num_bases=2, frames=FRAMES, latent_height=8,
                                            latent_width=8, trainable="full", head_channels=32)
    d, d_prime = make(True), make(False)
    assert isinstance(d, FlowDiscriminator) and d.conditional and not d_prime.conditional
    assert d.backbone is not d_prime.backbone
    x, t, cond = inputs()
    logits = d(x, t, cond, 1, x_in=x, t=t)
    assert logits.shape == (2,) and bool(torch.isfinite(logits).all())
    assert middle_feature_size(8, 8, FRAMES) == (FRAMES, 1, 1) and middle_feature_size(64, 48, 16) == (16, 8, 6)


def test_one_distillation_step_on_two_lanes_moves_only_the_student(unet):
    bases = [SD15Base(0, unet, CALLS), SD15Base(1, FakeUNet(CHANNELS, seed=1), CALLS)]
    latents = torch.randn(FRAMES, 4, 8, 8)

    def data(n, generator):
        return latents.repeat(n, 1, 1, 1), torch.randn(n, 5, 16, generator=generator), torch.zeros(n, 5, 16)

    teacher = motion(1)
    setup = sd15_setup.setup_from_parts([None, None], teacher, [data, data], frames=FRAMES, latent_height=8,
                                        latent_width=8, bases=bases, materialize=False)
    assert [lane.index for lane in setup.lanes] == [0, 1]
    frozen = [copy.deepcopy(b.unet.state_dict()) for b in bases]
    before = copy.deepcopy(setup.student.state_dict())
    stage = distill.Stage(8, 4, (distill.mse_phase(1, lr=1e-3),))
    optimizer = torch.optim.Adam(setup.student.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for lane in setup.lanes:
        pair = distill.draw_pair(stage, lane, setup.teacher, 1, generator)
        distill.mse_loss(distill.student_jump(lane.base, setup.student, pair), pair.teacher).backward()
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in setup.student.state_dict().items())
    for base, state in zip(bases, frozen):
        assert all(torch.equal(state[k], v) for k, v in base.unet.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in setup.teacher.state_dict().items())


# --- ComfyUI location and checkpoint headers ------------------------------------------------------------

def test_without_comfyui_the_error_says_how_to_point_at_one(monkeypatch, tmp_path):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(comfy_backend, "PACK_ROOT", tmp_path / "somewhere" / "adlightning")
    with pytest.raises(comfy_backend.ComfyUIMissingError, match="COMFYUI_PATH"):
        comfy_backend.find_comfyui()
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    with pytest.raises(comfy_backend.ComfyUIMissingError, match=str(tmp_path)):
        comfy_backend.find_comfyui()
    fake = tmp_path / "ComfyUI"
    (fake / "comfy").mkdir(parents=True)
    for name in ("sd.py", "model_management.py"):
        (fake / "comfy" / name).write_text("")
    (fake / "custom_nodes" / "adlightning").mkdir(parents=True)
    monkeypatch.setattr(comfy_backend, "PACK_ROOT", fake / "custom_nodes" / "adlightning")
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "elsewhere"))
    assert comfy_backend.find_comfyui() == fake  # the ComfyUI the pack is installed in comes first


def write_header(path, shapes):
    header = {k: {"dtype": "F16", "shape": list(s), "data_offsets": [0, 0]} for k, s in shapes.items()}
    data = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(data)) + data)
    return path


def test_header_check_accepts_sd15_and_names_what_else_a_file_is(tmp_path):
    shapes = sd15_fixture.sd15_checkpoint_shapes()
    good = write_header(tmp_path / "sd15.safetensors", shapes)
    comfy_backend.check_sd15_checkpoint(good)
    config = comfy_backend.unet_config_from_header(comfy_backend.read_header(good)[0])
    assert config["model_channels"] == 320 and config["channel_mult"] == [1, 2, 4, 4]
    assert config["context_dim"] == 768 and config["num_res_blocks"] == 2

    sd2 = {k: ((s[0], 1024) if k.endswith("attn2.to_k.weight") else s) for k, s in shapes.items()}
    with pytest.raises(comfy_backend.CheckpointError, match="SD2"):
        comfy_backend.check_sd15_checkpoint(write_header(tmp_path / "sd2.safetensors", sd2))
    motion_file = write_header(tmp_path / "mm.safetensors",
                               {"down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight": (320, 320)})
    with pytest.raises(comfy_backend.CheckpointError, match="motion module"):
        comfy_backend.check_sd15_checkpoint(motion_file)
    with pytest.raises(comfy_backend.CheckpointError, match="does not exist"):
        comfy_backend.check_sd15_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(comfy_backend.CheckpointError, match="not a readable safetensors"):
        comfy_backend.read_header(tmp_path / "junk.safetensors")


def test_a_base_parked_on_a_cpu_only_run_drops_its_weights_and_reads_them_again(unet):
    loads = []

    def load():
        loads.append(1)
        return copy.deepcopy(unet)

    base = SD15Base(0, None, CALLS, load=load)
    base.release_when_parked = True
    x, t, cond = inputs(clips=1)
    first = base(x, t, cond, None)
    base.to("cpu")  # what the loop's swapped placement does after a lane
    assert not base.loaded and loads == [1]
    assert torch.equal(base(x, t, cond, None), first) and loads == [1, 1]
    base.release_when_parked = False
    base.to("cpu")
    assert base.loaded


def test_a_discriminator_backbone_copies_an_unloaded_base_without_keeping_it_loaded(unet):
    """A rank that never runs base 0, or a CPU run holding one base at a time, builds D from base 0's weights
    and must not keep base 0 in memory for the rest of the phase."""
    loads = []

    def load():
        loads.append(1)
        return copy.deepcopy(unet)

    base = SD15Base(0, None, CALLS, load=load)
    base.to(torch.float64)  # a conversion asked for before the weights were read applies to the copy too
    backbone = comfy_backend.make_backbone(base, motion(1), trainable="light")
    assert loads == [1] and not base.loaded
    assert next(backbone.input_blocks.parameters()).dtype == torch.float64
    base.ensure_loaded()
    assert loads == [1, 1] and next(base.unet.parameters()).dtype == torch.float64
    comfy_backend.make_backbone(base, motion(1))  # a loaded base is used as it is
    assert loads == [1, 1]


def test_teacher_skeleton_from_the_header_has_the_loaded_teachers_parameters(tmp_path):
    from lightning.testing.motion import write_motion_module

    path = write_motion_module(tmp_path / "mm.safetensors", channels=CHANNELS)
    loaded = comfy_backend.load_teacher(path)
    skeleton = comfy_backend.load_teacher(path, materialize=False)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in loaded.state_dict().items()}
    assert loaded.info.channels == skeleton.info.channels == CHANNELS
