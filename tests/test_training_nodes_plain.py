"""The ComfyUI-free parts of the training nodes: their specs, run folders and the widget's log route checks,
the curves image, and the workflows' use of the stable inputs."""

import json
from pathlib import Path

import numpy as np
import pytest

from lightning.errors import InvalidInputError
from nodes import training_runs as runs
from nodes import training_specs as tspecs

REPO = Path(__file__).resolve().parents[1]


def test_training_nodes_document_every_input_and_keep_their_core_inputs():
    core = {
        "ADL_TrainingBases": ["ckpt_name", "bases"],
        "ADL_TrainingDataset": ["bases", "source", "prompts", "video_folder", "teacher", "clips_per_base", "frames",
                                "width", "height", "seed", "name"],
        "ADL_DistillStage": ["teacher", "bases", "dataset", "stage", "iterations", "run_name", "resume", "seed"],
        "ADL_DiscriminatorPreview": ["run", "model", "positive", "latent_image", "seed", "steps"],
    }
    by_id = {s.node_id: s for s in tspecs.TRAINING_NODES}
    assert set(by_id) == set(core)
    for node_id, names in core.items():
        spec = by_id[node_id]
        assert [i.id for i in spec.inputs][:len(names)] == names, node_id
        assert spec.category.startswith("AnimateDiff-Lightning/") and len(spec.description) > 100
        for i in spec.inputs:
            assert len(i.tooltip) > 15, (node_id, i.id)
            if i.type in ("INT", "FLOAT"):
                assert i.min <= i.default <= i.max, (node_id, i.id)
        for o in spec.outputs:
            assert len(o.tooltip) > 15
    stage = by_id["ADL_DistillStage"]
    assert stage.input("stage").options == ("128->32 mse+cfg", "32->8", "8->4", "4->2", "2->1")
    assert [o.type for o in stage.outputs] == ["MOTION_MODULE", "IMAGE", "IMAGE"]
    assert "healthy" in stage.description.lower() and "12" in stage.description
    assert {tspecs.stage_name(s) for s in stage.input("stage").options} == {"128->32", "32->8", "8->4", "4->2",
                                                                            "2->1"}


def _make_run(root: Path, folder: str, records=()) -> Path:
    path = root / folder
    (path / "state").mkdir(parents=True)
    (path / "config.toml").write_text("[run]\n")
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"cut by a kil')
    return path


def test_run_folders_newest_first_and_only_real_runs(tmp_path):
    _make_run(tmp_path, "alpha-20260101-120000")
    _make_run(tmp_path, "alpha-20260102-080000")
    _make_run(tmp_path, "beta-20251231-235959")
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "gamma-20260103-000000").mkdir()  # no config.toml
    assert runs.run_folders(tmp_path) == ["alpha-20260102-080000", "alpha-20260101-120000", "beta-20251231-235959"]
    assert runs.newest_run("alpha", tmp_path).name == "alpha-20260102-080000"
    assert runs.newest_run("delta", tmp_path) is None
    assert runs.run_folders(tmp_path / "missing") == []


@pytest.mark.parametrize("bad", ["../x-20260101-120000", "alpha-20260101-120000/..", "/etc/passwd", "..",
                                 "alpha-20260101-120000\\..", "alpha", "", "a..b-20260101-120000"])
def test_the_log_route_refuses_anything_but_a_run_folder_name(tmp_path, bad):
    _make_run(tmp_path, "alpha-20260101-120000")
    with pytest.raises(InvalidInputError):
        runs.log_payload(bad, None, tmp_path)


def test_log_payload_by_folder_and_by_run_name(tmp_path):
    records = [{"iteration": 1, "d": 1.3, "g": 0.7, "accuracy": 0.5, "preference": 0.5},
               {"event": "validation", "iteration": 1}]
    _make_run(tmp_path, "alpha-20260101-120000", records)
    assert runs.log_payload("alpha-20260101-120000", None, tmp_path) == {"run": "alpha-20260101-120000",
                                                                         "records": records}
    assert runs.log_payload(None, "alpha", tmp_path)["records"] == records
    assert runs.log_payload(None, "nothing_yet", tmp_path) == {"run": None, "records": []}
    with pytest.raises(InvalidInputError):
        runs.log_payload(None, "../alpha", tmp_path)


def test_curves_image_draws_each_figure_where_it_belongs():
    records = [{"iteration": i, "d": 1.4 - 0.1 * i, "g": 0.7 + 0.05 * i, "accuracy": 0.5 + 0.05 * i,
                "preference": 0.5 + 0.04 * i} for i in range(1, 9)]
    image = runs.curves_image(records, width=400, height=300)
    assert image.shape == (300, 400, 3) and image.dtype == np.uint8
    colour = lambda c: np.all(image == np.array(c, dtype=np.uint8), axis=-1)  # noqa: E731
    rows_of = lambda c: np.nonzero(colour(c).any(axis=1))[0]  # noqa: E731
    # loss panel on top, accuracy in the middle, preference at the bottom
    assert rows_of((255, 120, 90)).max() < 100 and rows_of((120, 220, 120)).max() < 100
    assert 100 <= rows_of((255, 200, 80)).min() and rows_of((255, 200, 80)).max() < 200
    assert rows_of((200, 140, 255)).min() >= 200
    # the accuracy line rises: its right end sits higher (smaller row) than its left end
    acc = colour((255, 200, 80))
    cols = np.nonzero(acc.any(axis=0))[0]
    assert np.nonzero(acc[:, cols[-1]])[0].mean() < np.nonzero(acc[:, cols[0]])[0].mean()
    empty = runs.curves_image([], width=200, height=120)
    assert empty.shape == (120, 200, 3)


def test_names_become_folder_names_only_when_safe():
    assert runs.check_name(" my_run.v2 ", "run_name") == "my_run.v2"
    for bad in ("", "../x", "a/b", "-x", "x" * 101):
        with pytest.raises(InvalidInputError):
            runs.check_name(bad, "run_name")


def test_workflows_use_the_training_nodes():
    wanted = {"distill_quickstart": {"ADL_TrainingBases", "ADL_TrainingDataset", "ADL_DistillStage",
                                     "ADL_LightningSampler"},
              "distill_progressive": {"ADL_DistillStage"},
              "discriminator_preview": {"ADL_DiscriminatorPreview"}}
    for name, types in wanted.items():
        workflow = json.loads((REPO / "workflows" / f"{name}.json").read_text())
        assert types <= {n["type"] for n in workflow["nodes"]}, name
    progressive = json.loads((REPO / "workflows" / "distill_progressive.json").read_text())
    stages = [n for n in progressive["nodes"] if n["type"] == "ADL_DistillStage"]
    assert [n["widgets_values"][0] for n in stages] == ["32->8", "8->4", "4->2"]
