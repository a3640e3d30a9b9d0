"""The ComfyUI-free parts of nodes/: specs, guard rails, placement, LoRA chains, folder registration, entry point."""

import asyncio
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lightning import schedule
from lightning.errors import InvalidInputError
from nodes import folders, guards, loras, specs
from nodes.placement import MotionInjection, insertion_index

REPO = Path(__file__).resolve().parents[1]


# --- specs ---------------------------------------------------------------------------------------------------

def test_every_node_documents_every_input_and_output():
    seen = set()
    for spec in specs.all_specs():
        assert spec.node_id.startswith("ADL_") and spec.node_id not in seen
        seen.add(spec.node_id)
        assert spec.category.startswith(specs.ROOT)
        assert len(spec.description) > 40, spec.node_id
        ids = [i.id for i in spec.inputs]
        assert len(ids) == len(set(ids))
        for i in spec.inputs:
            assert len(i.tooltip) > 15, (spec.node_id, i.id)
            if i.type in ("INT", "FLOAT"):
                assert i.default is not None and i.min <= i.default <= i.max, (spec.node_id, i.id)
        for o in spec.outputs:
            assert len(o.tooltip) > 15, (spec.node_id, o.name)


def test_stable_core_inputs_of_the_generation_nodes():
    core = {
        "ADL_LoadMotionModule": ["name"],
        "ADL_LoadMotionLoRA": ["name", "strength", "prev_motion_lora"],
        "ADL_ApplyMotionModule": ["model", "motion_module", "motion_lora", "scale"],
        "ADL_LightningSampler": ["model", "positive", "negative", "latent_image", "seed", "steps", "cfg", "denoise"],
        "ADL_LightningSigmas": ["model", "steps", "denoise"],
    }
    by_id = specs.spec_by_id()
    for node_id, names in core.items():
        have = [i.id for i in by_id[node_id].inputs]
        assert have[:len(names)] == names, node_id
    sampler = by_id["ADL_LightningSampler"]
    assert sampler.input("steps").default == 0 and sampler.input("cfg").default == 1.0
    assert sampler.input("denoise").default == 1.0
    assert by_id["ADL_LoadMotionLoRA"].input("strength").default == 0.8
    assert by_id["ADL_ApplyMotionModule"].input("scale").default == 1.0
    assert by_id["ADL_LoadMotionModule"].outputs[0].type == "MOTION_MODULE"
    assert by_id["ADL_LoadMotionLoRA"].outputs[0].type == "MOTION_LORA"
    steps = by_id["ADL_LoadMotionModule"].input("lightning_steps")
    assert steps.options == ("auto", "1", "2", "4", "8") and steps.default == "auto" and steps.optional


# --- guards --------------------------------------------------------------------------------------------------

SD15 = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2], "context_dim": 768,
        "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False}


def test_sd15_unet_passes_and_others_are_named():
    guards.check_sd15_unet(dict(SD15), "SD15", module_channels=(320, 640, 1280, 1280))
    guards.check_sd15_unet(dict(SD15, num_res_blocks=2), "SD15")
    sdxl = dict(SD15, channel_mult=[1, 2, 4], context_dim=2048, adm_in_channels=2816, use_linear_in_transformer=True,
                num_res_blocks=[2, 2, 2])
    with pytest.raises(guards.ModelFamilyError, match="SDXL") as e:
        guards.check_sd15_unet(sdxl, "SDXL")
    assert "SD1.5 checkpoint" in str(e.value) and isinstance(e.value, InvalidInputError)
    with pytest.raises(guards.ModelFamilyError, match="SD2"):
        guards.check_sd15_unet(dict(SD15, context_dim=1024, use_linear_in_transformer=True), "SD21UnclipH")
    with pytest.raises(guards.ModelFamilyError, match="not a UNet"):
        guards.check_sd15_unet(None, "Flux")
    with pytest.raises(guards.ModelFamilyError, match="level widths"):
        guards.check_sd15_unet(dict(SD15), "SD15", module_channels=(32, 64, 128, 128))


def test_frame_guards():
    assert guards.check_frames(16, 32, windows=False) == []
    assert guards.check_frames(32, 32, windows=False) == []
    with pytest.raises(guards.VideoLengthError, match="Context Windows") as e:
        guards.check_frames(48, 32, windows=False)
    assert "48 frames" in str(e.value) and "32" in str(e.value)
    assert guards.check_frames(48, 32, windows=True) == []
    (warning,) = guards.check_frames(4, 32, windows=False)
    assert "16" in warning and "4 frame" in warning


def test_step_guard_allows_the_known_good_pairs():
    assert guards.check_steps(4, 4) is None
    assert guards.check_steps(3, 2) is None
    assert guards.check_steps(7, None) is None
    msg = guards.check_steps(8, 4, "file name")
    assert "4-step" in msg and "Set steps to 4 (0 on the Lightning nodes)" in msg
    assert "read from the file name; if that is wrong, set lightning_steps on Load Motion Module" in msg
    assert "Set steps to 2 (or 3)" in guards.check_steps(4, 2)
    assert "set by lightning_steps on Load Motion Module" in guards.check_steps(8, 4, guards.FROM_INPUT)
    assert "read from the file's metadata" in guards.check_steps(8, 4, "metadata")
    # the same rule for a KSampler's full schedule, whose length is the step count; partial ones are not judged
    assert guards.check_schedule_steps(schedule.sigmas(8).tolist(), 4) == guards.check_steps(8, 4)
    assert guards.check_schedule_steps(schedule.sigmas(3).tolist(), 2) is None
    assert guards.check_schedule_steps(schedule.sigmas(8)[3:].tolist(), 4) is None


def test_steps_zero_without_a_step_count_says_how_to_set_it():
    msg = guards.missing_steps_message("Lightning Sampler", "AnimateDiff v2 (original keys)")
    assert "set lightning_steps on Load Motion Module" in msg and "20-25" in msg and "metadata" in msg


def test_cfg_guard_warns_above_two_for_lightning_modules_only():
    assert guards.check_cfg(1.0, 4) is None and guards.check_cfg(2.0, 4) is None
    assert guards.check_cfg(8.0, None) is None  # AnimateDiff v2 wants cfg 7.5
    msg = guards.check_cfg(8.0, 4, "file name")
    assert msg.startswith("cfg 8 with the 4-step Lightning module") and "set cfg to 1" in msg


def test_denoise_note_uses_the_widget_word_and_the_snapped_value():
    assert guards.check_denoise(4, 0.75) is None and guards.check_denoise(8, 0.625) is None
    msg = guards.check_denoise(8, 0.6)
    assert msg.startswith("denoise 0.6 is not on the 8-step grid; using 0.625 (5 of 8 steps)")
    assert "strength" not in msg


def test_sigma_guard_flags_normal_scheduler_at_two_steps_but_not_the_trained_grid():
    assert guards.check_sigmas(schedule.sigmas(4).tolist(), 4) is None
    assert guards.check_sigmas(schedule.sigmas(4, "sgm_uniform").tolist(), 4) is None
    assert guards.check_sigmas(schedule.sigmas(2, "simple").tolist(), 2) is None
    # ComfyUI's "normal" scheduler: linspace(999, 0, steps) in t, so 2 steps end at sigma_min
    normal2 = [schedule.sigma_max(), schedule.sigma_min(), 0.0]
    msg = guards.check_sigmas(normal2, 2)
    assert msg is not None and "breaks" in msg and "sgm_uniform" in msg
    # img2vid tails are not judged, nor are non-Lightning modules
    assert guards.check_sigmas(schedule.sigmas(4)[2:].tolist(), 4) is None
    assert guards.check_sigmas(normal2, None) is None


# --- placement -----------------------------------------------------------------------------------------------

class ResBlock(nn.Identity):
    pass


class SpatialTransformer(nn.Identity):
    pass


class Downsample(nn.Identity):
    pass


class Upsample(nn.Identity):
    pass


class TimestepEmbedSequential(nn.Sequential):
    pass


def fake_sd15_unet():
    """The SD1.5 ldm UNet's block structure (lightning/REFERENCE.md §1.2) with stand-in layers."""
    seq = TimestepEmbedSequential
    inputs = [seq(nn.Conv2d(1, 1, 1))]
    for level in range(4):
        for _ in range(2):
            inputs.append(seq(ResBlock(), SpatialTransformer()) if level < 3 else seq(ResBlock()))
        if level < 3:
            inputs.append(seq(Downsample()))
    outputs = []
    for level in range(4):
        for j in range(3):
            layers = [ResBlock()] + ([SpatialTransformer()] if level > 0 else [])
            if j == 2 and level < 3:
                layers.append(Upsample())
            outputs.append(seq(*layers))
    unet = nn.Module()
    unet.input_blocks = nn.ModuleList(inputs)
    unet.middle_block = seq(ResBlock(), SpatialTransformer(), ResBlock())
    unet.output_blocks = nn.ModuleList(outputs)
    return unet


class Marker(nn.Identity):
    def __init__(self, tag):
        super().__init__()
        self.tag = tag


def marker_set(has_mid=True):
    s = types.SimpleNamespace()
    s.down = [[Marker(f"d{i}{j}") for j in range(2)] for i in range(4)]
    s.mid = Marker("mid") if has_mid else None
    s.up = [[Marker(f"u{i}{j}") for j in range(3)] for i in range(4)]
    return s


def _layout(unet):
    return [[type(m).__name__ if not isinstance(m, Marker) else m.tag for m in stage]
            for stage in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]]


def test_insertion_rule():
    assert insertion_index([ResBlock(), SpatialTransformer()]) == 2
    assert insertion_index([ResBlock(), SpatialTransformer(), Upsample()]) == 2
    assert insertion_index([ResBlock(), Upsample()]) == 1
    assert insertion_index([ResBlock()]) == 1
    assert insertion_index([Downsample()]) is None
    assert insertion_index([ResBlock(), SpatialTransformer(), ResBlock()]) == 2


def test_injection_lands_at_the_animatediff_places_and_ejects_exactly():
    unet = fake_sd15_unet()
    before = _layout(unet)
    params_before = {k: v.clone() for k, v in unet.state_dict().items()}
    inj = MotionInjection.for_module_set(marker_set())
    inj.inject(unet)
    layout = _layout(unet)
    has = {i: [x for x in stage if x[:1] in "du" or x == "mid"] for i, stage in enumerate(layout)}
    down_stages = [i for i in range(12) if has[i]]
    assert down_stages == [1, 2, 4, 5, 7, 8, 10, 11]
    assert [has[i][0] for i in down_stages] == ["d00", "d01", "d10", "d11", "d20", "d21", "d30", "d31"]
    assert layout[12] == ["ResBlock", "SpatialTransformer", "mid", "ResBlock"]
    ups = [has[13 + i][0] for i in range(12)]
    assert ups == [f"u{i}{j}" for i in range(4) for j in range(3)]
    # before the Upsample in output blocks 2, 5, 8
    assert layout[13 + 2] == ["ResBlock", "u02", "Upsample"]
    assert layout[13 + 5] == ["ResBlock", "SpatialTransformer", "u12", "Upsample"]
    assert inj.injected_into(unet)
    inj.inject(unet)  # idempotent
    assert _layout(unet) == layout
    inj.eject(unet)
    assert _layout(unet) == before and not inj.injected_into(unet)
    after = unet.state_dict()
    assert after.keys() == params_before.keys() and all(torch.equal(after[k], params_before[k]) for k in after)
    inj.eject(unet)  # ejecting twice is harmless
    assert _layout(unet) == before


def test_injection_without_mid_and_foreign_layers_survive():
    unet = fake_sd15_unet()
    foreign = Marker("foreign")
    unet.output_blocks[3].append(foreign)
    inj = MotionInjection.for_module_set(marker_set(has_mid=False))
    inj.inject(unet)
    assert "mid" not in _layout(unet)[12]
    inj.eject(unet)
    assert unet.output_blocks[3][-1] is foreign


def test_injection_refuses_a_non_sd15_layout():
    unet = fake_sd15_unet()
    del unet.input_blocks[10]
    with pytest.raises(ValueError, match="input_blocks have 7 places"):
        MotionInjection.for_module_set(marker_set()).inject(unet)
    assert all("d" not in x for stage in _layout(unet) for x in stage if x.startswith("d0"))


# --- LoRA chains ---------------------------------------------------------------------------------------------

def test_lora_chain_is_immutable_and_compatible_with_evolved_shape():
    a = loras.extend(None, "zoom.ckpt", 0.8)
    b = loras.extend(a, "pan.ckpt", 0.5)
    assert loras.entries(a) == [("zoom.ckpt", 0.8)]
    assert loras.entries(b) == [("zoom.ckpt", 0.8), ("pan.ckpt", 0.5)]

    class EvolvedInfo:  # AnimateDiff-Evolved's MotionLoraInfo / MotionLoraList attribute shape
        def __init__(self, name, strength):
            self.name, self.strength, self.hash = name, strength, ""

    evolved = types.SimpleNamespace(loras=[EvolvedInfo("tilt.ckpt", 1.0)])
    c = loras.extend(evolved, "zoom.ckpt", 0.7)
    assert loras.entries(c) == [("tilt.ckpt", 1.0), ("zoom.ckpt", 0.7)]
    assert loras.entries(evolved) == [("tilt.ckpt", 1.0)]
    assert loras.entries(None) == []
    assert loras.entries(c.clone()) == loras.entries(c)


# --- folders -------------------------------------------------------------------------------------------------

def fake_folder_paths(tmp_path):
    fp = types.SimpleNamespace(models_dir=str(tmp_path / "models"), folder_names_and_paths={},
                               supported_pt_extensions={".ckpt", ".pt", ".safetensors", ".bin", ".pth"})

    def add_model_folder_path(name, path, is_default=False):
        paths, _ = fp.folder_names_and_paths.setdefault(name, ([], set()))
        if path not in paths:
            paths.append(path)

    fp.add_model_folder_path = add_model_folder_path
    return fp


def test_folders_registered_like_evolved_and_coexist(tmp_path):
    fp = fake_folder_paths(tmp_path)
    evolved_dir = str(tmp_path / "evolved" / "models")
    fp.add_model_folder_path("animatediff_models", evolved_dir)  # Evolved (or a yaml entry) came first
    folders.register(fp)
    folders.register(fp)  # loading twice changes nothing
    paths, exts = fp.folder_names_and_paths["animatediff_models"]
    assert paths == [evolved_dir, str(tmp_path / "models" / "animatediff_models")]
    assert ".ckpt" in exts and ".safetensors" in exts
    assert fp.folder_names_and_paths["animatediff_motion_lora"][0] == [str(tmp_path / "models" /
                                                                           "animatediff_motion_lora")]
    assert (tmp_path / "models" / "animatediff_models").is_dir()
    assert folders.download_dir(fp) == str(tmp_path / "models" / "animatediff_models")


# --- entry point ---------------------------------------------------------------------------------------------

def test_top_level_init_imports_without_comfyui_and_exposes_the_v3_entrypoint():
    assert "comfy" not in sys.modules
    spec = importlib.util.spec_from_file_location("adl_pack_under_test", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.WEB_DIRECTORY == "./js" and (REPO / "js").is_dir()
    assert asyncio.iscoroutinefunction(module.comfy_entrypoint)
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")  # ComfyUI would ignore the V3 entry point otherwise
    with pytest.raises(ImportError):  # only ComfyUI can run it
        asyncio.run(module.comfy_entrypoint())
    assert "comfy" not in sys.modules


# --- run-time warnings ---------------------------------------------------------------------------------------

class _Server:
    """Stand-in for ComfyUI's PromptServer: what a run sets, and what send_sync was given."""

    def __init__(self):
        self.last_prompt_id, self.last_node_id, self.client_id = "run-1", "7", "browser-a"
        self.sent = []

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))


def test_warnings_reach_the_browser_once_per_run_with_our_prefix(caplog):
    from nodes import keys, notify

    server = _Server()
    notifier = notify.Notifier(server)
    with caplog.at_level("WARNING", logger="nodes.notify"):
        assert notifier.warn("cfg 8 with the 4-step Lightning module")
        assert not notifier.warn("cfg 8 with the 4-step Lightning module")  # the second sampler of the run
        assert notifier.warn("only 4 frame(s)")
    assert [(e, d["message"], d["node"], d["prompt_id"], sid) for e, d, sid in server.sent] == [
        (keys.WARNING_EVENT, "[AnimateDiff-Lightning] cfg 8 with the 4-step Lightning module", "7", "run-1",
         "browser-a"),
        (keys.WARNING_EVENT, "[AnimateDiff-Lightning] only 4 frame(s)", "7", "run-1", "browser-a")]
    assert caplog.text.count("cfg 8") == 1
    server.last_prompt_id = "run-2"  # the next run hears it again
    assert notifier.warn("cfg 8 with the 4-step Lightning module") and len(server.sent) == 3


def test_keys_are_distinct_names():
    from nodes import keys

    names = [v for k, v in vars(keys).items() if k.isupper()]
    assert len(names) == len(set(names))


def test_the_registry_icon_exists_and_fits():
    import tomllib
    import xml.etree.ElementTree as ET

    icon = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]["Icon"]
    path = REPO / icon.split("/main/", 1)[1]
    assert path.is_file(), icon
    root = ET.parse(path).getroot()
    assert float(root.attrib["width"]) <= 800 and float(root.attrib["height"]) <= 400
