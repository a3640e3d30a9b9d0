"""OpenCV: the pack never asks pip for a second cv2 distribution, and a missing cv2 says how to get exactly one."""

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from lightning import metrics, opencv

REPO = Path(__file__).resolve().parents[1]


def _names(requirements) -> list[str]:
    """Distribution names of requirement strings, normalised as pip compares them."""
    out = []
    for line in requirements:
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", line).group(0)).lower())
    return out


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_no_plain_dependency_names_an_opencv_distribution():
    in_requirements = _names((REPO / "requirements.txt").read_text().splitlines())
    project = _pyproject()["project"]
    assert not set(in_requirements) & set(opencv.DISTRIBUTIONS)
    assert not set(_names(project["dependencies"])) & set(opencv.DISTRIBUTIONS)
    assert not set(_names(project["optional-dependencies"]["test"])) & set(opencv.DISTRIBUTIONS)
    # One opt-in way to get it when none is present, the variant the messages recommend.
    assert _names(project["optional-dependencies"]["opencv"]) == [opencv.RECOMMENDED]
    assert "matplotlib" in in_requirements and "matplotlib" in _names(project["dependencies"])


def test_readme_test_command_installs_opencv_only_when_cv2_is_missing():
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- test-command:start -->", 1)[1].split("<!-- test-command:end -->", 1)[0]
    command = block.replace("```", "").strip()
    assert 'python -c "import cv2"' in command and '|| .venv/bin/pip install -q -e ".[opencv]"' in command
    assert not re.search(r"opencv-(contrib-)?python", command)  # no variant hard-coded beside the extra


def test_require_cv2_returns_the_module():
    import cv2

    assert opencv.require_cv2() is cv2


@pytest.fixture
def no_cv2(monkeypatch):
    """cv2 cannot be imported (``None`` in sys.modules makes ``import cv2`` raise ImportError)."""
    monkeypatch.setitem(sys.modules, "cv2", None)


@pytest.mark.parametrize("installed, expected", [
    ([], [r"Install exactly one OpenCV distribution", r"python -m pip install opencv-python-headless",
          r"opencv-python if you want", r"Do not install one when another variant"]),
    (["opencv-python-headless", "opencv-python"],
     [r"Several OpenCV distributions are installed \(opencv-python-headless, opencv-python\)",
      r"pip uninstall -y opencv-python-headless opencv-python && python -m pip install opencv-python-headless"]),
    (["opencv-python"], [r"pip install --force-reinstall opencv-python", r"replace it with opencv-python-headless"]),
])
def test_missing_cv2_names_the_fix_for_what_is_installed(no_cv2, monkeypatch, installed, expected):
    monkeypatch.setattr(opencv, "installed_distributions", lambda: list(installed))
    with pytest.raises(opencv.MissingOpenCVError) as caught:
        opencv.require_cv2("Load Image Sequence")
    message = str(caught.value)
    assert message.startswith("[AnimateDiff-Lightning] Load Image Sequence needs OpenCV (the cv2 module)")
    for pattern in expected:
        assert re.search(pattern, message), (pattern, message)
    assert isinstance(caught.value, ImportError)


def test_installed_distributions_reads_pip_records(monkeypatch):
    present = {"opencv-python-headless", "opencv-contrib-python"}

    def distribution(name):
        if name not in present:
            raise metadata.PackageNotFoundError(name)
        return object()

    monkeypatch.setattr(opencv.metadata, "distribution", distribution)
    assert opencv.installed_distributions() == ["opencv-python-headless", "opencv-contrib-python"]


def test_metrics_and_image_sequence_fail_clearly_without_cv2(no_cv2, monkeypatch, tmp_path):
    monkeypatch.setattr(opencv, "installed_distributions", lambda: [])
    video = np.zeros((2, 32, 32, 3), np.float32)
    with pytest.raises(opencv.MissingOpenCVError, match="optical flow .* needs OpenCV"):
        metrics.warp_error(video)
    # Measures that need no flow still work, and so does the plot.
    assert metrics.flicker_index(video)["mean"] == 0.0
    assert metrics.plot_series({"s": [0.1, 0.2]}).shape == (360, 640, 3)
    from nodes import image_sequence

    with pytest.raises(opencv.MissingOpenCVError, match="Load Image Sequence needs OpenCV"):
        image_sequence.read_frames([tmp_path / "a.png"])


def test_the_core_imports_without_cv2():
    code = ("import sys; sys.modules['cv2'] = None\n"
            "import lightning.metrics, lightning.opencv, lightning.toy.demo, nodes.image_sequence\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
