"""Released motion modules we know by name, and their download from the Hugging Face hub.

The loader node lists these next to the files already on disk; choosing one that is missing downloads it into the
motion-module folder through ``huggingface_hub`` (so its cache, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and tokens all
behave as users expect), checks it, and otherwise fails with a message that says which file to fetch by hand,
from where, and where to put it.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

LIGHTNING_REPO = "ByteDance/AnimateDiff-Lightning"
#: Sizes from the hub listing (lightning/REFERENCE.md §1.5): fp16, no metadata.
LIGHTNING_COMFYUI_BYTES = 908_929_664
LIGHTNING_DIFFUSERS_BYTES = 907_702_248


@dataclass(frozen=True)
class KnownFile:
    """A released file: where it lives on the hub and what a good copy looks like."""

    repo_id: str
    filename: str
    size: int
    steps: int | None = None
    layout: str = "original"  # "original" (AnimateDiff / ComfyUI keys) or "diffusers" (MotionAdapter keys)
    revision: str = "main"

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision}/{self.filename}"


#: The step counts ByteDance released Lightning modules for.
RELEASED_STEPS = (1, 2, 4, 8)
#: How long the reachability check waits for the hub's host before calling the machine offline.
REACH_TIMEOUT_S = 1.5


def _lightning_files() -> dict[str, KnownFile]:
    files = {}
    for steps in RELEASED_STEPS:
        name = f"animatediff_lightning_{steps}step_comfyui.safetensors"
        files[name] = KnownFile(LIGHTNING_REPO, name, LIGHTNING_COMFYUI_BYTES, steps, "original")
    return files


#: What the loader offers for download. The ``_diffusers`` twins hold the same weights in another layout; they
#: load from disk like any file but are not offered for download, to keep the list short.
KNOWN_FILES: dict[str, KnownFile] = _lightning_files()


class DownloadError(RuntimeError):
    """A known file could not be fetched or did not check out; the message says how to get it by hand."""


def manual_instructions(known: KnownFile, dest_dir: str | os.PathLike) -> str:
    return (f"Download {known.filename} ({known.size:,} bytes) by hand from {known.url} "
            f"and put it in {Path(dest_dir)}")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline_reason(endpoint: str | None = None, *, timeout: float = REACH_TIMEOUT_S) -> str | None:
    """Why no download can work right now, or None when the hub's host takes connections.

    ``HF_HUB_OFFLINE`` (as huggingface_hub reads it) wins; otherwise one TCP connection to the endpoint's host
    answers within ``timeout``. Without this check, huggingface_hub retries a dead network with back-off for
    about 20 s before it gives up, and the node sits silent all that time.
    """
    try:
        from huggingface_hub import constants  # it reads HF_HUB_OFFLINE once, on import
        offline, default = bool(getattr(constants, "HF_HUB_OFFLINE", False)), constants.ENDPOINT
    except ImportError:  # pragma: no cover - huggingface_hub is a declared dependency
        offline, default = _env_true("HF_HUB_OFFLINE"), "https://huggingface.co"
    if offline:
        return "HF_HUB_OFFLINE is set"
    url = urlsplit(endpoint or os.environ.get("HF_ENDPOINT") or default)
    host = url.hostname
    if not host:
        return f"the hub endpoint {url.geturl()!r} names no host"
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        url = urlsplit(proxy if "//" in proxy else f"http://{proxy}")  # behind a proxy, only the proxy is reachable
        host = url.hostname or host
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"no network route to {host}:{port} ({exc.strerror or type(exc).__name__})"


def _supports(fn: Callable, parameter: str) -> bool:
    try:
        return parameter in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def download(name: str, dest_dir: str | os.PathLike, *, progress: Callable[[int, int], None] | None = None,
             known_files: dict[str, KnownFile] | None = None, verify: Callable[[Path], None] | None = None,
             endpoint: str | None = None) -> Path:
    """Fetch the known file ``name`` into ``dest_dir`` (once) and return its path.

    ``progress(done_bytes, total_bytes)`` is called as bytes arrive. ``verify(path)`` may raise to reject a
    download (the loader passes a structural check of the motion module); the byte size is always checked. A
    file that is already in ``dest_dir`` with the right size is returned without touching the network. Any
    failure raises ``DownloadError`` with the exact file, URL and destination for a manual download.
    """
    files = KNOWN_FILES if known_files is None else known_files
    if name not in files:
        raise DownloadError(f"{name!r} is not a known released file; known files: {', '.join(sorted(files))}")
    known = files[name]
    dest_dir = Path(dest_dir)
    target = dest_dir / known.filename
    if target.is_file() and target.stat().st_size == known.size:
        return target

    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a declared dependency
        raise DownloadError(f"huggingface_hub is not installed. {manual_instructions(known, dest_dir)}") from exc

    kwargs = {"repo_id": known.repo_id, "filename": known.filename, "revision": known.revision,
              "local_dir": str(dest_dir)}
    if endpoint is not None:
        kwargs["endpoint"] = endpoint
    if progress is not None and _supports(hf_hub_download, "tqdm_class"):
        kwargs["tqdm_class"] = _progress_tqdm(progress)
    offline = offline_reason(endpoint)
    if offline is not None:
        # the hub's own cache may still hold the file (downloaded by another tool): that needs no network
        kwargs["local_files_only"] = True
        log.info("%s: looking for %s in the Hugging Face cache only", offline, known.filename)
    else:
        log.info("downloading %s from %s into %s", known.filename, known.url, dest_dir)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        path = Path(hf_hub_download(**kwargs))
    except Exception as exc:
        if offline is not None:
            raise DownloadError(f"{known.filename} is not on disk and cannot be downloaded now: {offline}. "
                                f"{manual_instructions(known, dest_dir)}") from exc
        raise DownloadError(f"Could not download {known.filename} from the Hugging Face hub "
                            f"({type(exc).__name__}: {exc}). {manual_instructions(known, dest_dir)}") from exc

    size = path.stat().st_size
    if size != known.size:
        _discard(path)
        raise DownloadError(f"{path} has {size:,} bytes, expected {known.size:,}: the download is incomplete "
                            f"or not the released file, so it was removed. {manual_instructions(known, dest_dir)}")
    if verify is not None:
        try:
            verify(path)
        except Exception as exc:
            _discard(path)
            raise DownloadError(f"{path} failed its check ({exc}), so it was removed. "
                                f"{manual_instructions(known, dest_dir)}") from exc
    return path


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        log.warning("could not remove the rejected download %s", path)


def _progress_tqdm(progress: Callable[[int, int], None]):
    """A tqdm subclass that forwards byte counts to ``progress`` (huggingface_hub drives a tqdm per file)."""
    from tqdm.auto import tqdm

    class ProgressTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            out = super().update(n)
            if self.total:
                progress(int(self.n), int(self.total))
            return out

    return ProgressTqdm
