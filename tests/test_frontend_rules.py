"""One source for every rule the browser hints apply: the frontend reads them from the loader's node schema
(``nodes.guards.frontend_rules``), so the JavaScript must hold no copy, and must decide like the server does."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lightning import checkpoints, hub
from nodes import guards, keys

REPO = Path(__file__).resolve().parents[1]
JS = sorted((REPO / "js").glob("*.js"))
RULES_FIXTURE = REPO / "tests" / "js" / "rules.json"
FIXTURE_ARGS = {"not_downloaded": ["animatediff_lightning_8step_comfyui.safetensors"],
                "steps_in_metadata": {"my_renamed_module.safetensors": 4}}


def test_the_js_tests_use_the_rules_the_server_sends():
    assert json.loads(RULES_FIXTURE.read_text()) == json.loads(json.dumps(guards.frontend_rules(**FIXTURE_ARGS))), (
        "tests/js/rules.json is stale: regenerate it from nodes.guards.frontend_rules")


def test_the_javascript_holds_no_copy_of_a_rule():
    rules = guards.frontend_rules()
    literals = [*rules["schedulers"], rules["sampler"], keys.WARNING_EVENT]
    for path in JS:
        code = re.sub(r"//[^\n]*", "", path.read_text())  # comments may name things
        for literal in literals:
            assert f'"{literal}"' not in code and f"'{literal}'" not in code, (path.name, literal)
        assert not re.search(r"/[^/\n]*step[^/\n]*/[gimsuy]*\.(test|exec)|\.match\(/[^/\n]*step", code, re.I), (
            f"{path.name} has its own step-count pattern")
        assert not re.search(r"===\s*[23]\b|\b[23]\s*===", code), f"{path.name} compares against a step count"
        assert not re.search(r"[<>]=?\s*2(\.0)?\b", code), f"{path.name} has its own cfg limit"


NAMES = ["animatediff_lightning_4step_comfyui.safetensors", "AnimateDiff-Lightning-2step.safetensors",
         "sub/animatediff_lightning_8steps.safetensors", "lightning1step.sft", "mm_sd_v15_v2.ckpt",
         "my_lightning_module.safetensors", "LIGHTNING_4_STEP.ckpt"]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_javascript_decides_like_the_python_guards(tmp_path):
    rules = guards.frontend_rules()
    cases = [(m, s, cfg) for m in hub.RELEASED_STEPS for s in range(1, 11) for cfg in (1.0, 2.0, 2.5, 8.0)]
    script = tmp_path / "decide.mjs"
    script.write_text(
        f"import {{ samplerProblems, stepsInFileName }} from {json.dumps((REPO / 'js' / 'lightning_core.js').as_uri())};\n"
        f"const rules = {json.dumps(rules)};\n"
        f"const cases = {json.dumps(cases)};\n"
        f"const names = {json.dumps(NAMES)};\n"
        "const node = (steps, cfg) => ({ type: 'KSampler', widgets: [{ name: 'steps', value: steps },"
        " { name: 'cfg', value: cfg }, { name: 'scheduler', value: rules.schedulers[0] },"
        " { name: 'sampler_name', value: rules.sampler }] });\n"
        "const out = cases.map(([m, s, cfg]) => samplerProblems(node(s, cfg), m, rules).map((p) => p.split(' ')[0]));\n"
        "console.log(JSON.stringify({ problems: out, names: names.map((n) => stepsInFileName(n, rules)) }));\n")
    result = subprocess.run([shutil.which("node"), str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    decided = json.loads(result.stdout)
    for (module_steps, steps, cfg), problems in zip(cases, decided["problems"]):
        expected = []
        if guards.check_steps(steps, module_steps):
            expected.append("steps")
        if guards.check_cfg(cfg, module_steps):
            expected.append("cfg")
        assert problems == expected, (module_steps, steps, cfg)
    assert decided["names"] == [checkpoints.steps_in_file_name(Path(n).name) for n in NAMES]
