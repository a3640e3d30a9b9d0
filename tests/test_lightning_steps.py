"""The Lightning step count travels with every module we save, and a load says where it came from."""

import pytest

from lightning import checkpoints
from lightning.checkpoints import load_motion_module, save_motion_module
from lightning.errors import InvalidInputError
from lightning.testing.motion import write_motion_module


@pytest.fixture
def tiny(tmp_path):
    return load_motion_module(write_motion_module(tmp_path / "tiny_v2.safetensors"))


def test_a_step_count_given_by_the_caller_is_saved_and_read_back_from_the_metadata(tiny, tmp_path):
    assert tiny.info.lightning_steps is None
    # the training loop's way: plain "lightning_steps" in the metadata argument
    path = save_motion_module(tiny, tmp_path / "student.safetensors", metadata={"lightning_steps": "4"})
    metadata = checkpoints.read_metadata(path)
    assert metadata[checkpoints.STEPS_KEY] == "4" and metadata["lightning_steps"] == "4"
    assert checkpoints.lightning_steps_origin(path, metadata) == (4, checkpoints.FROM_METADATA)
    reloaded = load_motion_module(path)
    assert reloaded.info.lightning_steps == 4 and "Lightning 4-step" in reloaded.info.label


def test_the_callers_count_wins_over_the_count_the_module_came_with(tiny, tmp_path):
    teacher = save_motion_module(tiny, tmp_path / "teacher.safetensors", metadata={checkpoints.STEPS_KEY: "8"})
    student = load_motion_module(teacher)  # a student starts as a copy of its 8-step teacher
    assert student.info.lightning_steps == 8
    path = save_motion_module(student, tmp_path / "student_4.safetensors", metadata={"lightning_steps": "4"})
    assert load_motion_module(path).info.lightning_steps == 4
    # and without a caller's count, the module's own is kept: a renamed copy stays a Lightning module
    copy = save_motion_module(student, tmp_path / "copy_without_a_count_in_its_name.safetensors")
    assert checkpoints.lightning_steps_origin(copy, checkpoints.read_metadata(copy)) == (8, "metadata")


@pytest.mark.parametrize("metadata", [{"lightning_steps": "four"}, {"lightning_steps": "0"},
                                      {"lightning_steps": "4", checkpoints.STEPS_KEY: "8"}])
def test_a_bad_step_count_is_refused_before_writing(tiny, tmp_path, metadata):
    with pytest.raises(InvalidInputError, match="step"):
        save_motion_module(tiny, tmp_path / "bad.safetensors", metadata=metadata)
    assert not (tmp_path / "bad.safetensors").exists()


def test_origin_is_metadata_first_then_file_name():
    name = "animatediff_lightning_2step_comfyui.safetensors"
    assert checkpoints.lightning_steps_origin(name) == (2, checkpoints.FROM_FILE_NAME)
    assert checkpoints.lightning_steps_origin(name, {checkpoints.STEPS_KEY: "4"}) == (4, checkpoints.FROM_METADATA)
    assert checkpoints.lightning_steps_origin("mm_sd_v15_v2.ckpt") == (None, None)
    assert checkpoints.steps_in_file_name("AnimateDiff-Lightning-8steps.sft") == 8


def test_metadata_of_files_that_are_not_safetensors_is_empty(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"\x80junk")
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 16)
    assert checkpoints.read_metadata(tmp_path / "x.ckpt") == {}
    assert checkpoints.read_metadata(tmp_path / "broken.safetensors") == {}
    assert checkpoints.read_metadata(tmp_path / "missing.safetensors") == {}
