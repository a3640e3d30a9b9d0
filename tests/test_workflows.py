"""Every example workflow connects existing inputs of existing nodes with matching types."""

import json
from pathlib import Path

import pytest

from workflow_tools import offline_schemas, to_api, validate

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


def test_there_are_workflows_with_thumbnails():
    names = {p.stem for p in WORKFLOWS}
    assert "txt2vid_lightning_4step" in names
    for p in WORKFLOWS:
        thumbs = [p.with_suffix(ext) for ext in (".webp", ".png", ".jpg")]
        assert any(t.exists() and t.stat().st_size > 1000 for t in thumbs), f"{p.name} has no thumbnail"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_node_schemas(path):
    workflow = json.loads(path.read_text())
    assert workflow.get("version") == 0.4 and workflow["nodes"]
    assert validate(workflow, offline_schemas()) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_converts_to_an_api_prompt(path):
    schemas = offline_schemas()
    prompt = to_api(json.loads(path.read_text()), schemas)
    for node in prompt.values():
        schema = schemas[node["class_type"]]
        for s in schema.inputs:
            if not s.optional:
                assert s.name in node["inputs"], (node["class_type"], s.name)


def test_validation_catches_broken_workflows():
    workflow = json.loads((REPO / "workflows" / "txt2vid_lightning_4step.json").read_text())
    schemas = offline_schemas()
    sampler = next(n for n in workflow["nodes"] if n["type"] == "ADL_LightningSampler")
    # a renamed input
    sampler["inputs"][0]["name"] = "modle"
    problems = validate(workflow, schemas)
    assert any("no input named 'modle'" in p for p in problems)
    assert any("required input 'model' is not connected" in p for p in problems)
    sampler["inputs"][0]["name"] = "model"
    # a wire of the wrong type
    decode = next(n for n in workflow["nodes"] if n["type"] == "VAEDecode")
    link = next(l for l in workflow["links"] if l[3] == sampler["id"] and l[4] == 0)
    link[1], link[2] = decode["id"], 0
    assert any("fed IMAGE" in p for p in validate(workflow, schemas))
    # a missing widget value
    workflow = json.loads((REPO / "workflows" / "txt2vid_lightning_4step.json").read_text())
    sampler = next(n for n in workflow["nodes"] if n["type"] == "ADL_LightningSampler")
    sampler["widgets_values"].pop()
    assert any("widget values" in p for p in validate(workflow, schemas))
    # an unknown node
    sampler["type"] = "ADL_NoSuchNode"
    assert any("unknown node type" in p for p in validate(workflow, schemas))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_node_titles_do_not_state_values_the_user_edits(path):
    """A title like "16 frames at 512x512" goes stale the moment someone changes the widgets under it."""
    import re

    for node in json.loads(path.read_text())["nodes"]:
        title = node.get("title")
        if not title:
            continue
        for value in node.get("widgets_values", []):
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                assert not re.search(rf"(?<![\d.]){value:g}(?![\d.])", title), (node["type"], title, value)
            elif isinstance(value, str) and len(value) > 2 and value not in ("fixed", "auto"):
                assert value.lower() not in title.lower(), (node["type"], title, value)


def test_the_title_check_catches_a_stale_size():
    import re

    assert re.search(rf"(?<![\d.]){512:g}(?![\d.])", "16 frames at 512x512")
    assert not re.search(rf"(?<![\d.]){1:g}(?![\d.])", "Frames at SD1.5 size")
