"""A minimal websocket client (standard library only) that collects ComfyUI's JSON messages in a thread.

The test environment has no websocket package; ComfyUI's ``/ws`` speaks plain RFC 6455, and a listener only
needs the handshake, unmasked server frames and a masked close.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import threading
import time


class Listener:
    def __init__(self, host: str, port: int, client_id: str):
        self.messages: list[dict] = []
        self._lock = threading.Lock()
        self._sock = socket.create_connection((host, port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self._sock.sendall(request.encode())
        header = b""
        while b"\r\n\r\n" not in header:
            chunk = self._sock.recv(1)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            header += chunk
        if b" 101 " not in header.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {header[:200]!r}")
        self._sock.settimeout(None)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _run(self) -> None:
        try:
            while not self._stop:
                b0, b1 = self._read(2)
                opcode, length = b0 & 0x0F, b1 & 0x7F
                if length == 126:
                    length = struct.unpack(">H", self._read(2))[0]
                elif length == 127:
                    length = struct.unpack(">Q", self._read(8))[0]
                if b1 & 0x80:
                    mask = self._read(4)
                    payload = bytes(c ^ mask[i % 4] for i, c in enumerate(self._read(length)))
                else:
                    payload = self._read(length)
                if opcode == 1:
                    with self._lock:
                        self.messages.append(json.loads(payload.decode()))
                elif opcode == 8:
                    return
        except (ConnectionError, OSError, ValueError):
            return

    def of_type(self, kind: str) -> list[dict]:
        with self._lock:
            return [m["data"] for m in self.messages if m.get("type") == kind]

    def wait_for(self, predicate, timeout: float = 600.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._lock:
                for message in self.messages:
                    if predicate(message):
                        return message
            time.sleep(0.2)
        raise TimeoutError("no matching websocket message")

    def close(self) -> None:
        self._stop = True
        try:
            self._sock.sendall(bytes([0x88, 0x80]) + os.urandom(4))
            self._sock.close()
        except OSError:
            pass
