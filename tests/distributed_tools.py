"""Launching torchrun from tests and benchmarks: loopback only, one thread per rank, a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "ddp_toy_worker.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    out = dict(os.environ)
    out.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1")
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    out.update(extra)
    return out


def torchrun_args(nproc: int, *, rdzv: bool = False, max_restarts: int = 0) -> list[str]:
    """``python -m torch.distributed.run`` on 127.0.0.1: a static master, or the c10d rendezvous that a
    multi-machine run uses (``--nnodes 1`` here)."""
    port = free_port()
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if rdzv:
        args += ["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                 "--rdzv-id", f"test{port}"]
    else:
        args += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    if max_restarts:
        args += ["--max-restarts", str(max_restarts)]
    return args


def start(args: list[str], **kwargs) -> subprocess.Popen:
    """torchrun in a session of its own, so that :func:`stop` reaches its workers too."""
    return subprocess.Popen(args, cwd=REPO, env=kwargs.pop("env", None) or env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def stop(process: subprocess.Popen) -> None:
    """Kill the launcher and every process it started (workers outlive a killed launcher otherwise)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def finish(process: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for the job; on timeout kill its whole process group and fail with what it printed."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(process)
        out, err = process.communicate()
        raise AssertionError(f"the job did not finish within {timeout} s:\n{out[-2000:]}\n{err[-3000:]}") from None
    finally:
        stop(process)  # no stray worker may survive the test
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run(args: list[str], *, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    return finish(start(args, **kwargs), timeout)


def rank_pids(master_port: int, rank: int) -> list[int]:
    """PIDs of the torchrun workers of the job on ``master_port`` with ``RANK=rank`` (Linux: /proc)."""
    want = {f"MASTER_PORT={master_port}".encode(), f"RANK={rank}".encode()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if want <= environ:
            found.append(int(entry.name))
    return found


def master_port(args: list[str]) -> int:
    if "--master-port" in args:
        return int(args[args.index("--master-port") + 1])
    return int(args[args.index("--rdzv-endpoint") + 1].rsplit(":", 1)[1])
