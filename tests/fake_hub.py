"""A stand-in for huggingface.co on loopback: answers ``/{repo}/resolve/{revision}/{file}`` like the hub does
for an LFS file, from bytes or files on disk, and 404 for anything else. Used by the hub-download tests and by the
integration test that lets a real ComfyUI download a "released" module through our loader."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import threading
from pathlib import Path


class FakeHub:
    def __init__(self, files: dict[str, bytes | Path], size_override: dict[str, int] | None = None):
        """``files`` maps "repo_id/filename" to the content (bytes) or a path to stream it from."""
        self.files = files
        self.requests: list[tuple[str, str]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _find(self):
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return None
                return owner.files.get(f"{parts[0]}/{parts[1]}/{'/'.join(parts[4:])}")

            def _head(self, content) -> bool:
                owner.requests.append((self.command, self.path))
                if content is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return False
                size = len(content) if isinstance(content, bytes) else os.path.getsize(content)
                digest = owner._digest(content)
                self.send_response(200)
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("X-Linked-Etag", f'"{digest}"')
                self.send_header("ETag", f'"{digest}"')
                self.send_header("X-Linked-Size", str(size))
                self.send_header("Content-Length", str(size))
                self.end_headers()
                return True

            def do_HEAD(self):
                self._head(self._find())

            def do_GET(self):
                content = self._find()
                if not self._head(content):
                    return
                if isinstance(content, bytes):
                    self.wfile.write(content)
                else:
                    with open(content, "rb") as f:
                        shutil.copyfileobj(f, self.wfile, 1 << 20)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._digests: dict[int, str] = {}
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _digest(self, content) -> str:
        # the etag only has to be stable per file; hashing 900 MB on every request would be slow
        key = id(content)
        if key not in self._digests:
            data = content if isinstance(content, bytes) else Path(content).name.encode()
            self._digests[key] = hashlib.sha256(data).hexdigest()
        return self._digests[key]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
