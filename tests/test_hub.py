"""The hub-download path, exercised against a fake Hugging Face endpoint on loopback and in offline mode."""

import os

import pytest

from fake_hub import FakeHub
from lightning import hub

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # noqa: E402

PAYLOAD = bytes(range(256)) * 8  # 2048 bytes
NAME = "animatediff_lightning_4step_comfyui.safetensors"


@pytest.fixture
def online(monkeypatch):
    # conftest forces offline mode; these tests talk to a loopback server only
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def fake_hub():
    server = FakeHub({f"ByteDance/AnimateDiff-Lightning/{NAME}": PAYLOAD})
    yield server
    server.close()


def known(size=len(PAYLOAD)):
    return {"animatediff_lightning_4step_comfyui.safetensors":
            hub.KnownFile("ByteDance/AnimateDiff-Lightning", "animatediff_lightning_4step_comfyui.safetensors",
                          size, 4)}


def test_known_files_are_the_released_lightning_modules():
    assert sorted(f.steps for f in hub.KNOWN_FILES.values()) == [1, 2, 4, 8]
    for name, f in hub.KNOWN_FILES.items():
        assert f.filename == name and f.size == 908_929_664 and f.repo_id == "ByteDance/AnimateDiff-Lightning"
        assert f.url == f"https://huggingface.co/ByteDance/AnimateDiff-Lightning/resolve/main/{name}"


def test_download_lands_in_the_folder_with_progress_and_verification(tmp_path, online, fake_hub):
    progress, verified = [], []
    path = hub.download(NAME, tmp_path / "animatediff_models", known_files=known(), endpoint=fake_hub.endpoint,
                        progress=lambda done, total: progress.append((done, total)), verify=verified.append)
    assert path == tmp_path / "animatediff_models" / NAME
    assert path.read_bytes() == PAYLOAD
    assert progress and progress[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert verified == [path]
    assert ("GET", f"/ByteDance/AnimateDiff-Lightning/resolve/main/{NAME}") in fake_hub.requests
    # second time: the file is there, the hub is not asked again
    fake_hub.requests.clear()
    assert hub.download(NAME, tmp_path / "animatediff_models", known_files=known(),
                        endpoint=fake_hub.endpoint) == path
    assert fake_hub.requests == []


def test_a_file_of_the_wrong_size_is_removed_and_the_error_says_how_to_fetch_it(tmp_path, online, fake_hub):
    with pytest.raises(hub.DownloadError) as e:
        hub.download(NAME, tmp_path, known_files=known(size=len(PAYLOAD) + 1), endpoint=fake_hub.endpoint)
    msg = str(e.value)
    assert NAME in msg and "huggingface.co/ByteDance/AnimateDiff-Lightning/resolve/main/" in msg
    assert str(tmp_path) in msg and "removed" in msg
    assert not (tmp_path / NAME).exists()


def test_a_file_failing_verification_is_removed(tmp_path, online, fake_hub):
    def reject(path):
        raise ValueError("not a motion module")

    with pytest.raises(hub.DownloadError, match="not a motion module"):
        hub.download(NAME, tmp_path, known_files=known(), endpoint=fake_hub.endpoint, verify=reject)
    assert not (tmp_path / NAME).exists()


def test_offline_mode_fails_with_manual_instructions(tmp_path):
    assert constants.HF_HUB_OFFLINE  # set by conftest: tests never reach the real hub
    with pytest.raises(hub.DownloadError) as e:
        hub.download(NAME, tmp_path, known_files=known())
    msg = str(e.value)
    assert "by hand" in msg and hub.KNOWN_FILES[NAME].url in msg
    assert str(tmp_path) in msg
    assert not (tmp_path / NAME).exists()


def test_unknown_name_lists_known_files(tmp_path):
    with pytest.raises(hub.DownloadError, match="animatediff_lightning_4step_comfyui"):
        hub.download("mm_sd_v15_v2.ckpt", tmp_path)
    assert os.listdir(tmp_path) == []


def test_a_file_missing_on_the_hub_fails_with_manual_instructions(tmp_path, online):
    server = FakeHub({})
    try:
        with pytest.raises(hub.DownloadError) as e:
            hub.download(NAME, tmp_path, known_files=known(), endpoint=server.endpoint)
    finally:
        server.close()
    assert "by hand" in str(e.value) and NAME in str(e.value)
    assert not (tmp_path / NAME).exists()


def test_offline_mode_fails_at_once_without_retries(tmp_path):
    import time

    start = time.monotonic()
    with pytest.raises(hub.DownloadError) as e:
        hub.download(NAME, tmp_path, known_files=known())
    assert time.monotonic() - start < 2.0
    assert "HF_HUB_OFFLINE is set" in str(e.value) and "not on disk" in str(e.value)


def test_no_route_to_the_hub_fails_at_once_with_manual_instructions(tmp_path, online):
    import socket
    import time

    with socket.socket() as s:  # a loopback port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert hub.offline_reason(dead).startswith("no network route to 127.0.0.1")
    start = time.monotonic()
    with pytest.raises(hub.DownloadError) as e:
        hub.download(NAME, tmp_path, known_files=known(), endpoint=dead)
    assert time.monotonic() - start < 2.0
    msg = str(e.value)
    assert "no network route" in msg and "by hand" in msg and hub.KNOWN_FILES[NAME].url in msg


def test_a_reachable_hub_is_not_called_offline(online, fake_hub):
    assert hub.offline_reason(fake_hub.endpoint) is None


def test_behind_a_proxy_the_proxy_is_what_must_answer(online, fake_hub, monkeypatch):
    port = fake_hub.endpoint.rsplit(":", 1)[1]
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    # the hub's own host is not reachable from here, but the (stand-in) proxy is: not offline
    assert hub.offline_reason("https://hub.invalid") is None
