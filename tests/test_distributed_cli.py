"""``python -m training run`` under torchrun: a killed rank stops the job, resume and elastic restarts
continue it to the same student as a run that never stopped (2 gloo ranks on 127.0.0.1, the toy world)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from safetensors.torch import load_file

from tests import distributed_tools as tools

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the rank's process through /proc")]

CONFIG = """
[run]
name = "ddp"
runs_dir = "{runs}"
seed = 0
device = "cpu"
threads = 1
[model]
kind = "toy"
bases = [0, 1]
[stage]
name = "8->4"
iterations = 4
lr = 5e-3
clips = 2
micro_batch = 2
grad_clip = 1.0
[checkpoint]
every = 1
keep = 20
[validation]
every = 0
"""

STUDENT = "students/ddp_4step.safetensors"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_cli")
    path = root / "toy.toml"
    path.write_text(CONFIG.format(runs=(root / "runs").as_posix()))
    return path


@pytest.fixture(scope="module")
def uninterrupted(config):
    """One process running both bases, never stopped."""
    run_dir = config.parent / "runs" / "single"
    result = tools.run([tools.sys.executable, "-m", "training", "run", str(config), "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(run_dir / STUDENT)


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _start_and_kill_rank1(args: list[str], run_dir, *, after_state: int):
    """Start torchrun, SIGKILL rank 1 once ``after_state`` checkpoints exist; returns (process, kill time)."""
    process = tools.start(args)
    port = tools.master_port(args)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and process.poll() is None:
        states = list((run_dir / "state").glob("iter-*.safetensors")) if (run_dir / "state").is_dir() else []
        if len(states) >= after_state:
            pids = tools.rank_pids(port, 1)
            if pids:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                return process, time.monotonic()
        time.sleep(0.02)
    tools.stop(process)
    out, err = process.communicate()
    pytest.fail(f"the run ended or stalled before rank 1 could be killed:\n{out[-2000:]}\n{err[-3000:]}")


def test_killed_rank_stops_the_job_naming_it_and_resume_finishes_the_same(config, uninterrupted):
    run_dir = config.parent / "runs" / "killed"
    args = tools.torchrun_args(2) + ["-m", "training", "run", str(config), "--run-dir", str(run_dir)]
    process, killed_at = _start_and_kill_rank1(args, run_dir, after_state=3)
    result = tools.finish(process, timeout=90)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert time.monotonic() - killed_at < 60
    # torchrun's failure report names the rank that died and its signal
    assert "rank      : 1" in out and "SIGKILL" in out, out[-3000:]
    done = max(int(p.stem.split("-")[1]) for p in (run_dir / "state").glob("iter-*.safetensors"))
    assert 3 <= done < 8  # it stopped mid-run, with the last whole checkpoints kept

    resumed = tools.run(tools.torchrun_args(2) + ["-m", "training", "resume", str(run_dir)], timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming 8->4 at iteration" in resumed.stdout + resumed.stderr
    assert _max_diff(uninterrupted, load_file(run_dir / STUDENT)) <= 1e-6


def test_elastic_restart_resumes_from_the_last_checkpoint(config, uninterrupted):
    run_dir = config.parent / "runs" / "elastic"
    args = tools.torchrun_args(2, max_restarts=1) + ["-m", "training", "run", str(config), "--run-dir", str(run_dir)]
    process, _ = _start_and_kill_rank1(args, run_dir, after_state=2)
    result = tools.finish(process, timeout=150)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "resuming 8->4 at iteration" in out
    assert _max_diff(uninterrupted, load_file(run_dir / STUDENT)) <= 1e-6
