"""Load Image Sequence: natural order, selection, sizes and formats, clear errors, reload fingerprint."""

import os

import cv2
import numpy as np
import pytest

from lightning.errors import InvalidInputError
from nodes import image_sequence as seq


def frame(level: int, size=(12, 10), channels=3, dtype=np.uint8):
    scale = 257 if dtype == np.uint16 else 1
    shape = (size[1], size[0]) + ((channels,) if channels > 1 else ())
    return np.full(shape, level * scale, dtype)


def write(folder, name, image):
    folder.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(folder / name), image)


def test_frames_come_in_natural_name_order_with_selection(tmp_path):
    for f in range(12):
        write(tmp_path / "poses", f"pose_{f}.png", frame(10 * f))
    (tmp_path / "poses" / "notes.txt").write_text("not an image")
    folder = seq.resolve_folder("poses", tmp_path)  # relative to the input folder
    names = [p.name for p in seq.frame_paths(folder)]
    assert names == [f"pose_{f}.png" for f in range(12)]  # pose_10 after pose_9, not after pose_1
    assert [p.name for p in seq.frame_paths(folder, start=2, count=3, every_nth=2)] == \
        ["pose_2.png", "pose_4.png", "pose_6.png"]
    images = seq.read_frames(seq.frame_paths(folder))
    assert images.shape == (12, 10, 12, 3) and images.dtype == np.float32
    assert np.allclose(images[:, 0, 0, 0], [10 * f / 255 for f in range(12)])
    assert seq.resolve_folder(str(folder), "/nonexistent") == folder  # absolute paths are taken as they are


def test_formats_are_normalised_to_rgb_0_1_and_sizes_to_the_first_frame(tmp_path, caplog):
    write(tmp_path, "a_1.png", np.dstack([frame(0, channels=1), frame(0, channels=1), frame(255, channels=1)]))
    write(tmp_path, "a_2.png", frame(128, channels=1))                                     # grey
    write(tmp_path, "a_3.png", np.dstack([frame(0, channels=3), frame(255, channels=1)]))  # BGRA
    write(tmp_path, "a_4.png", frame(65535 // 257, channels=3, dtype=np.uint16))           # 16 bit
    write(tmp_path, "a_5.png", frame(50, size=(24, 20)))                                    # other size
    images = seq.read_frames(seq.frame_paths(tmp_path))
    assert images.shape == (5, 10, 12, 3)
    assert np.allclose(images[0, 0, 0], [1, 0, 0])  # BGR on disk -> RGB
    assert np.allclose(images[1, 0, 0], [128 / 255] * 3)
    assert np.allclose(images[2, 0, 0], [0, 0, 0])  # alpha dropped
    assert np.allclose(images[3, 0, 0], [1, 1, 1])
    assert np.allclose(images[4], 50 / 255)
    assert "resized to the first frame" in caplog.text


def test_bad_folders_and_settings_say_what_to_do(tmp_path):
    with pytest.raises(InvalidInputError, match="not a folder"):
        seq.resolve_folder("missing", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no images"):
        seq.frame_paths(tmp_path / "empty")
    write(tmp_path / "one", "x.png", frame(1))
    with pytest.raises(InvalidInputError, match="from frame 5"):
        seq.frame_paths(tmp_path / "one", start=5)
    with pytest.raises(InvalidInputError, match="every_nth"):
        seq.frame_paths(tmp_path / "one", every_nth=0)
    (tmp_path / "one" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InvalidInputError, match="broken.png"):
        seq.read_frames(seq.frame_paths(tmp_path / "one"))


def test_fingerprint_changes_when_the_folder_changes(tmp_path):
    write(tmp_path, "f_1.png", frame(1))
    first = seq.fingerprint(tmp_path)
    assert seq.fingerprint(tmp_path) == first
    write(tmp_path, "f_2.png", frame(2))
    second = seq.fingerprint(tmp_path)
    assert second != first
    os.utime(tmp_path / "f_1.png", ns=(1, 1))
    assert seq.fingerprint(tmp_path) != second
