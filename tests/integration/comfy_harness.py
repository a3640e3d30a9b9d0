"""A real ComfyUI server for integration tests: headless, CPU, loopback only, in a throwaway base directory.

The server runs ComfyUI from ``COMFYUI_PATH`` with ``COMFYUI_PYTHON`` (its own environment); the pack is linked
into ``<base>/custom_nodes`` and the random-weight fixtures into ``<base>/models``. Graphs go in as API-format
prompts through ``POST /prompt``; results are read back from ``/history`` and the output folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "adlightning"
HOST = "127.0.0.1"


def comfyui_path() -> Path | None:
    value = os.environ.get("COMFYUI_PATH")
    return Path(value) if value else None


def comfyui_python(comfy: Path) -> str:
    explicit = os.environ.get("COMFYUI_PYTHON")
    if explicit:
        return explicit
    for candidate in (comfy / "venv" / "bin" / "python", comfy.parent / "venv" / "bin" / "python"):
        if candidate.exists():
            return str(candidate)
    return "python3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class PromptFailed(AssertionError):
    def __init__(self, message, details):
        super().__init__(message)
        self.details = details


@dataclass
class Result:
    prompt_id: str
    outputs: dict
    messages: list

    def cached_nodes(self) -> set[str]:
        return {n for kind, data in self.messages if kind == "execution_cached" for n in data.get("nodes", [])}


class ComfyServer:
    def __init__(self, comfy: Path, base: Path, *, extra_custom_nodes: dict[str, Path] | None = None,
                 models: dict[str, dict[str, Path]] | None = None, log_path: Path | None = None):
        self.comfy = comfy
        self.base = base
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = log_path or base / "comfyui.log"
        self.proc: subprocess.Popen | None = None
        custom = base / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        links = {PACK_DIR_NAME: REPO, **(extra_custom_nodes or {})}
        for name, target in links.items():
            link = custom / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        for folder, files in (models or {}).items():
            d = base / "models" / folder
            d.mkdir(parents=True, exist_ok=True)
            for name, target in files.items():
                link = d / name
                if not link.exists():
                    link.symlink_to(target)

    def start(self, timeout: float = 300.0, extra_args=(), env: dict | None = None) -> "ComfyServer":
        cmd = [comfyui_python(self.comfy), "main.py", "--cpu", "--listen", HOST, "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--preview-method", "none",
               *extra_args]
        self._log = open(self.log_path, "w")
        # offline unless a test points the hub at its own loopback fake
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        env = {k: v for k, v in env.items() if v is not None}
        self.proc = subprocess.Popen(cmd, cwd=self.comfy, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f}s; log:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # --- HTTP -------------------------------------------------------------------------------------------------
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def object_info(self) -> dict:
        return self.get("/object_info")

    def submit(self, prompt: dict, client_id: str | None = None) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        if status != 200:
            raise PromptFailed(f"prompt rejected ({status}): {json.dumps(body)[:2000]}", body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 1800.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}; log:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f}s")

    def run(self, prompt: dict, timeout: float = 1800.0) -> Result:
        prompt_id = self.submit(prompt)
        entry = self.wait(prompt_id, timeout)
        messages = [tuple(m) for m in entry["status"].get("messages", [])]
        if entry["status"].get("status_str") != "success":
            errors = [data for kind, data in messages if kind == "execution_error"]
            detail = errors[0] if errors else entry["status"]
            raise PromptFailed(f"prompt failed: {json.dumps(detail)[:3000]}", detail)
        return Result(prompt_id, entry["outputs"], messages)

    def run_error(self, prompt: dict, timeout: float = 1800.0) -> dict:
        """Run a prompt that must fail; return the execution_error (or validation error) it produced."""
        try:
            prompt_id = self.submit(prompt)
        except PromptFailed as rejected:
            return {"validation": rejected.details}
        entry = self.wait(prompt_id, timeout)
        assert entry["status"].get("status_str") == "error", f"prompt unexpectedly succeeded: {entry['outputs']}"
        errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
        assert errors, entry["status"]
        return errors[0]

    def output_file(self, item: dict) -> Path:
        return self.base / "output" / item.get("subfolder", "") / item["filename"]

    def latent(self, result: Result, node_id: str) -> torch.Tensor:
        item = result.outputs[node_id]["latents"][0]
        return load_file(str(self.output_file(item)))["latent_tensor"]


class WebSocketListener:
    """What the browser hears: a websocket to ``/ws?clientId=...`` collecting every JSON message with the time it
    arrived (stdlib only; the server's frames to a client are unmasked text frames)."""

    def __init__(self, server: "ComfyServer", client_id: str | None = None):
        import base64
        import threading

        self.client_id = client_id or uuid.uuid4().hex
        self.messages: list[tuple[float, str, dict]] = []
        self._sock = socket.create_connection((HOST, server.port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self._sock.sendall((f"GET /ws?clientId={self.client_id} HTTP/1.1\r\nHost: {HOST}:{server.port}\r\n"
                            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                            "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self._sock.recv(1)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _read(self) -> None:
        try:
            while True:
                first, second = self._exact(2)
                length = second & 0x7F
                if length == 126:
                    length = int.from_bytes(self._exact(2), "big")
                elif length == 127:
                    length = int.from_bytes(self._exact(8), "big")
                payload = self._exact(length)
                if first & 0x0F == 0x1:  # text: ComfyUI's JSON messages (binary frames are previews)
                    message = json.loads(payload)
                    self.messages.append((time.monotonic(), message.get("type"), message.get("data") or {}))
                elif first & 0x0F == 0x8:
                    return
        except (OSError, ConnectionError, ValueError):
            return

    def of_type(self, kind: str) -> list[tuple[float, dict]]:
        return [(t, data) for t, k, data in list(self.messages) if k == kind]

    def wait_for(self, predicate, timeout: float = 3600.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for item in list(self.messages):
                if predicate(*item):
                    return item
            time.sleep(0.05)
        raise TimeoutError(f"no matching websocket message in {timeout:.0f}s; got "
                           f"{[k for _, k, _ in self.messages][-20:]}")

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


def fixture_dir() -> Path:
    d = Path(os.environ.get("ADL_FIXTURE_DIR", Path.home() / ".cache" / "adlightning" / "fixtures"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
