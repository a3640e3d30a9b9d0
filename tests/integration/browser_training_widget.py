"""Checks the training widget in a real browser (dev tool, run by hand; needs Chromium and the ``playwright``
Python package, neither a dependency of the pack):

    COMFYUI_PATH=... COMFYUI_PYTHON=... ADL_FIXTURE_DIR=... \\
        python tests/integration/browser_training_widget.py --out DIR [--chromium /usr/bin/chromium]

It starts ComfyUI headless with this pack and two random SD1.5 checkpoints, opens the page in headless
Chromium with a fresh profile, loads a small training graph (two bases, teacher dataset of one 64x64x8 clip
per base, one 8->4 stage of 1+1 iterations) and queues it from the page, so the websocket messages reach the
node on the canvas. It saves a screenshot while the run is going and one after it ended, reloads the page and
saves a third once the widget has restored the curves from the run folder's log; it prints, per screenshot,
how many pixels of each curve colour the widget's canvas holds (0 = the curve is not drawn).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "workflows"))
sys.path.insert(0, str(REPO))

from comfy_harness import ComfyServer, comfyui_path, fixture_dir  # noqa: E402
from graphs import LIGHTNING_4STEP, SD15  # noqa: E402

SEED1 = "sd15_random_seed1.safetensors"
COLOURS = {"mse": (90, 170, 255), "d": (255, 120, 90), "g": (120, 220, 120), "accuracy": (255, 200, 80),
           "preference": (200, 140, 255)}

CANVAS_STATS = """(colours) => {
  const node = window.app.graph._nodes.find((n) => n.type === "ADL_DistillStage");
  const state = node && node.adlTraining;
  if (!state) return null;
  const c = state.canvas, data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  const counts = {};
  for (const [k, [r, g, b]] of Object.entries(colours)) {
    let n = 0;
    for (let i = 0; i < data.length; i += 4) if (data[i] === r && data[i + 1] === g && data[i + 2] === b) n++;
    counts[k] = n;
  }
  return {run: state.run, status: state.status, records: state.records.filter((r) => !r.event).length,
          size: [c.width, c.height], pixels: counts};
}"""


def workflow(run_name: str, *, resume: str = "new", iterations: int = 2, mse_only: bool = False,
             one_base: bool = False) -> dict:
    from _build import Workflow

    w = Workflow(scale=1.0)
    mm = w.node("ADL_LoadMotionModule", (20, 40), (300, 90), widgets={"name": LIGHTNING_4STEP,
                                                                     "group_norm": "per_frame",
                                                                     "lightning_steps": "auto"})
    b1 = w.node("ADL_TrainingBases", (20, 170), (300, 70), widgets={"ckpt_name": SD15})
    b2 = b1 if one_base else w.node("ADL_TrainingBases", (20, 280), (300, 70), widgets={"ckpt_name": SEED1},
                                    inputs={"bases": (b1, 0)})
    ds = w.node("ADL_TrainingDataset", (20, 390), (300, 400),
                widgets={"source": "teacher", "prompts": "a cat walking on a wall\nwaves breaking on a beach",
                         "video_folder": "x", "clips_per_base": 1, "frames": 8, "width": 64, "height": 64, "seed": 0,
                         "name": f"itest_teacher_{1 if one_base else 2}", "stride": 1, "clips_per_video": 1, "teacher_steps": 2},
                inputs={"bases": (b2, 0), "teacher": (mm, 0)})
    w.node("ADL_DistillStage", (360, 40), (460, 760),
           widgets={"stage": "8->4", "iterations": iterations, "run_name": run_name, "resume": resume, "seed": 0,
                    "learning_rate": 0.0, "clips": 1, "precision": "fp32", "gradient_checkpointing": False,
                    "discriminator": "light", "resident_bases": "one", "save_every": 1, "validate_every": 0,
                    "validation_prompts": "a cat", "mse_only": mse_only, "memory_budget_gb": 1000.0,
                    "optimizer": "adam"},
           inputs={"teacher": (mm, 0), "bases": (b2, 0), "dataset": (ds, 0)})
    return w.to_json()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", type=Path, help="ComfyUI base directory (reuse one to keep its dataset cache)")
    ap.add_argument("--timeout", type=float, default=5400)
    ap.add_argument("--run-name", help="queue resume = latest on this finished or stopped run instead of a new one "
                                       "(the widget then gets the run's records in the start message)")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--mse-only", action="store_true")
    ap.add_argument("--one-base", action="store_true")
    args = ap.parse_args(argv)
    comfy = comfyui_path()
    if comfy is None:
        ap.error("set COMFYUI_PATH (and COMFYUI_PYTHON) to a ComfyUI checkout")
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    d = fixture_dir()
    base = args.base or Path(tempfile.mkdtemp(prefix="adl_widget_"))
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
                                    "Comfy.Workflow.ShowMissingNodesWarning": False}))
    models = {"checkpoints": {SD15: d / SD15, SEED1: d / SEED1},
              "animatediff_models": {LIGHTNING_4STEP: d / "motion" / LIGHTNING_4STEP}}
    server = ComfyServer(comfy, base, models=models).start(timeout=900)
    run_name = args.run_name or f"widget{int(time.time())}"
    graph = workflow(run_name, resume="latest" if args.run_name else "new", iterations=args.iterations,
                     mse_only=args.mse_only, one_base=args.one_base)
    report = {}
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                tempfile.mkdtemp(prefix="adl_chromium_profile_"), executable_path=str(args.chromium), headless=True,
                viewport={"width": 1280, "height": 860},
                args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync"])
            page = context.pages[0] if context.pages else context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url, wait_until="networkidle")
            page.wait_for_function("() => window.app && window.app.graph", timeout=120_000)
            page.keyboard.press("Escape")
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", graph)
            page.wait_for_timeout(1000)
            page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
            page.wait_for_function(
                "() => { const n = window.app.graph._nodes.find((n) => n.type === 'ADL_DistillStage');"
                " return n && n.adlTraining && n.adlTraining.records.filter((r) => !r.event).length >= 1; }",
                timeout=args.timeout * 1000, polling=2000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(args.out / "1_during_run.png"))
            report["during"] = page.evaluate(CANVAS_STATS, COLOURS)
            page.wait_for_function(
                "() => { const n = window.app.graph._nodes.find((n) => n.type === 'ADL_DistillStage');"
                " return n && n.adlTraining && /done|failed/.test(n.adlTraining.status); }",
                timeout=args.timeout * 1000, polling=2000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(args.out / "2_after_run.png"))
            report["after"] = page.evaluate(CANVAS_STATS, COLOURS)
            page.reload(wait_until="networkidle")
            page.wait_for_function("() => window.app && window.app.graph && window.app.graph._nodes.length > 0",
                                   timeout=120_000)
            page.wait_for_function(
                "() => { const n = window.app.graph._nodes.find((n) => n.type === 'ADL_DistillStage');"
                " return n && n.adlTraining && n.adlTraining.records.filter((r) => !r.event).length >= 1; }",
                timeout=120_000, polling=500)
            page.wait_for_timeout(500)
            page.screenshot(path=str(args.out / "3_after_reload.png"))
            report["after_reload"] = page.evaluate(CANVAS_STATS, COLOURS)
            report["page_errors"] = [e for e in errors if "training" in e or "adl" in e.lower()]
            context.close()
    finally:
        server.stop()
    print(json.dumps(report, indent=1))
    ok = all(report.get(k) and report[k]["records"] >= 1 and report[k]["pixels"]["d"] > 0
             for k in ("during", "after", "after_reload"))
    return 0 if ok and not report.get("page_errors") else 1


if __name__ == "__main__":
    raise SystemExit(main())
