"""Run-time warnings for the person at the browser, not only the server console.

A warning goes to the console log and, as a websocket event (``keys.WARNING_EVENT``), to the browser that queued
the run, where ``js/lightning_hints.js`` shows it as a toast and on the node that was running. Each distinct
message is sent once per run: a sampler called per batch, or a guard that runs for every sampler of a graph, does
not repeat itself.
"""

from __future__ import annotations

import logging
import threading

from . import keys

log = logging.getLogger(__name__)

PREFIX = "[AnimateDiff-Lightning]"


class Notifier:
    """Deduplicates per run and sends; ``server`` is ComfyUI's ``PromptServer`` (or a stand-in in tests)."""

    def __init__(self, server=None):
        self._server = server
        self._lock = threading.Lock()
        self._run = object()
        self._sent: set[str] = set()

    @property
    def server(self):
        if self._server is None:
            try:
                from server import PromptServer  # ComfyUI's own module; absent outside ComfyUI

                self._server = PromptServer.instance
            except (ImportError, AttributeError):
                return None
        return self._server

    def warn(self, message: str) -> bool:
        """Log and send ``message`` unless this run already had it; True when it was sent."""
        server = self.server
        run = getattr(server, "last_prompt_id", None)
        with self._lock:
            if run != self._run:
                self._run, self._sent = run, set()
            if message in self._sent:
                return False
            self._sent.add(message)
        text = f"{PREFIX} {message}"
        log.warning("%s", text)
        if server is not None:
            server.send_sync(keys.WARNING_EVENT, {"message": text, "node": getattr(server, "last_node_id", None),
                                                  "prompt_id": run}, getattr(server, "client_id", None))
        return True


_NOTIFIER = Notifier()


def warn(message: str) -> bool:
    return _NOTIFIER.warn(message)
