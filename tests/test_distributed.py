"""Distillation across ranks: bases to ranks, trainables-only all-reduce, equivalence with one process.

The torchrun tests launch ``torch.distributed.run`` with 2 CPU ranks on gloo over 127.0.0.1 and compare with
one process running every lane of the same tiny toy world.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from tests import distributed_tools as tools
from training import distributed

# --- bases to ranks -------------------------------------------------------------------------------------


def test_one_base_per_rank_as_in_table_1():
    rows = distributed.assignment_table(8, 8)
    assert [r["bases"] for r in rows] == [[i] for i in range(8)]
    assert all(r["replica"] == 0 for r in rows)
    assert distributed.assign(8, 8, 3).total == 8


def test_fewer_ranks_accumulate_their_share_and_scale_by_all_bases():
    a = [distributed.assign(5, 2, r) for r in range(2)]
    assert a[0].bases == (0, 2, 4) and a[1].bases == (1, 3)
    assert sorted(b for x in a for b in x.bases) == list(range(5))
    assert all(x.total == 5 and x.scale == pytest.approx(0.2) for x in a)


def test_more_ranks_replicate_the_assignment_with_own_data_streams():
    # 8 bases on 2 machines of 8 GPUs: the paper's 8-rank table twice
    rows = distributed.assignment_table(8, 16)
    assert [r["bases"][0] for r in rows] == list(range(8)) * 2
    assert [r["replica"] for r in rows] == [0] * 8 + [1] * 8
    assert distributed.assign(8, 16, 9).total == 16
    seeds = {distributed.lane_seed(0, r["bases"][0], r["replica"]) for r in rows}
    assert len(seeds) == 16  # every rank draws its own stream
    # replica 0 draws what a single process running every lane draws
    assert distributed.lane_seed(7, 3, 0) == distributed.lane_seed(7, 3)


def test_uneven_replication_warns_that_bases_weigh_differently():
    with pytest.warns(UserWarning, match="one replica more"):
        distributed.assign(2, 3, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distributed.assign(2, 4, 3)


def test_bad_worlds_and_lane_lists_are_refused():
    errors = pytest.importorskip("lightning.errors")
    with pytest.raises(errors.InvalidInputError, match="at least one base"):
        distributed.assign(0, 2, 0)
    with pytest.raises(errors.InvalidInputError, match="not a valid rank"):
        distributed.assign(2, 2, 2)
    with pytest.raises(errors.InvalidInputError, match="3 lanes"):
        distributed.select([1, 2, 3], distributed.assign(2, 2, 0))


def test_device_per_local_rank():
    assert distributed.device_for("cpu", 1, 2) == "cpu"
    if not torch.cuda.is_available():
        assert distributed.device_for("auto", 1, 2) == "cpu"
    errors = pytest.importorskip("lightning.errors")
    with pytest.raises(errors.InvalidInputError, match="all 2 ranks of this machine on one GPU"):
        distributed.device_for("cuda:0", 0, 2)


def test_single_process_is_untouched():
    world, device = distributed.init("cpu", environ={})
    assert not world.distributed and device == "cpu"
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    sync = distributed.GradientSync(world)
    sync([p], 1)
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and sync.calls == 0
    assert distributed.broadcast_module(torch.nn.Linear(2, 2), world) == 0
    assert distributed.gather({"a": 1}, world) == [{"a": 1}]


def test_buckets_split_by_size_and_dtype():
    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(10, dtype=torch.float64), torch.zeros(30)]
    runs = distributed._buckets(ts, bucket_bytes=80)
    assert sorted(map(sorted, runs)) == [[0, 1], [2], [3]]


def test_a_restarted_job_finds_the_run_folder_it_was_writing(tmp_path, monkeypatch):
    from training.config import Config

    config = Config()
    config.run.runs_dir, config.run.name = str(tmp_path), "xmodel"
    for name, run_id in (("xmodel-1", "job-a"), ("xmodel-2", "job-b"), ("other-3", "job-a")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.toml").write_text("")
        (tmp_path / name / "distributed.json").write_text(json.dumps({"run_id": run_id}))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    first = distributed.World(0, 2, backend="gloo", restart=0)
    again = distributed.World(0, 2, backend="gloo", restart=1)
    assert distributed.restarted_run(first, config, None) is None  # a first start never resumes
    assert distributed.restarted_run(again, config, None) == tmp_path / "xmodel-1"
    assert distributed.restarted_run(again, config, str(tmp_path / "xmodel-2")) == tmp_path / "xmodel-2"
    assert distributed.restarted_run(again, config, str(tmp_path / "new")) is None


# --- under torchrun -------------------------------------------------------------------------------------

def _load(path):
    return torch.load(path, weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _worker(out, nproc, *extra, rdzv=False):
    if nproc == 0:
        cmd = [tools.sys.executable, str(tools.WORKER)]
    else:
        cmd = tools.torchrun_args(nproc, rdzv=rdzv) + [str(tools.WORKER)]
    result = tools.run(cmd + [str(out), "--iterations", "3", *extra])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    return _worker(tmp_path_factory.mktemp("single"), 0, "--phases", "mse,conditional,mse:bases=3")


@pytest.mark.slow
def test_two_ranks_one_base_each_equal_one_process_with_both(tmp_path, single_process):
    # the c10d rendezvous is what a multi-machine run uses; here on one node over loopback
    multi = _worker(tmp_path, 2, "--phases", "mse,conditional,mse:zero,mse:bases=3", rdzv=True)
    for phase in ("mse", "conditional"):
        want = _load(single_process / phase / "student_rank0.pt")
        assert _max_diff(want, _load(single_process / phase / "initial_rank0.pt")) > 1e-4  # it did train
        for rank in (0, 1):
            assert _max_diff(want, _load(multi / phase / f"student_rank{rank}.pt")) <= 1e-6, phase
            if phase != "mse":
                assert _max_diff(_load(single_process / phase / "disc_rank0.pt"),
                                 _load(multi / phase / f"disc_rank{rank}.pt")) <= 1e-6
            report = json.loads((multi / phase / f"report_rank{rank}.json").read_text())
            assert report["bases"] == [rank] and report["replicas_agree"]
            # every frozen base on every rank is bit-identical to a freshly built one
            assert report["base_hashes"] == report["fresh_hashes"]
            # what travels is exactly the student's gradients (its mid module: the toy's only module that
            # gets any), nothing of the bases
            grad_bytes = sum(t.numel() * t.element_size() for k, t in want.items() if k.startswith("mid_block."))
            assert report["student_sync_bytes"] == [grad_bytes] * 3
            assert report["calls"] == (3 if phase == "mse" else 6)

    # ZeroRedundancyOptimizer: each rank keeps half of Adam's state; the update is the same
    for rank in (0, 1):
        assert _max_diff(_load(single_process / "mse" / "student_rank0.pt"),
                         _load(multi / "mse-zero" / f"student_rank{rank}.pt")) <= 1e-6
    # three bases on two ranks (bases 0 and 2 on rank 0, base 1 on rank 1): still the mean over all three.
    # The sums now run in a different order, and Adam turns rounding on near-zero gradient entries into steps
    # of up to lr, so the gradient is what is compared tightly; a wrong weighting (1/4, 1/4, 1/2) would be off
    # by the size of a whole base's gradient.
    want = _load(single_process / "mse-bases=3" / "grads_rank0.pt")
    scale = max(float(g.abs().max()) for g in want.values())
    for rank in (0, 1):
        report = json.loads((multi / "mse-bases=3" / f"report_rank{rank}.json").read_text())
        assert report["bases"] == ([0, 2] if rank == 0 else [1])
        assert _max_diff(want, _load(multi / "mse-bases=3" / f"grads_rank{rank}.pt")) <= 1e-6 * scale
        assert _max_diff(_load(single_process / "mse-bases=3" / "student_rank0.pt"),
                         _load(multi / "mse-bases=3" / f"student_rank{rank}.pt")) <= 1e-4
