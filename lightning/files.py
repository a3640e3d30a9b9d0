"""Writing files so that a reader never sees half of one.

Everything we save (motion modules, fixtures, checkpoints of a distillation run) is written to a hidden sibling
of its destination and renamed into place only once complete; on any failure the partial file is removed and
an existing file of that name is left as it was. ``safetensors`` creates files with mode 0600, which would hide
a saved module from a ComfyUI running under another account, so published files get the usual
``0666 & ~umask`` mode.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    try:  # Linux tells the umask without changing it (os.umask would race with other threads)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends normally it becomes ``path``.

    The temporary keeps ``path``'s extension, because some writers (OpenCV's VideoWriter) choose the format
    from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.partial{path.suffix}")
    try:
        yield temporary
        if not temporary.exists():
            raise FileNotFoundError(f"nothing was written to {temporary}")
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
