"""Runs the frontend extension's logic tests under Node's built-in test runner."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_lightning_hint_logic_under_node():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed, so the frontend logic tests cannot run")
    result = subprocess.run([node, "--test", str(REPO / "tests" / "js")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and "# pass" in result.stdout
