"""Renders each example workflow in a real ComfyUI frontend and saves the screenshot as its thumbnail.

Dev tool, run by hand (needs a ComfyUI checkout, Chromium and the ``playwright`` Python package; none of them
is a dependency of the pack):

    COMFYUI_PATH=~/ComfyUI COMFYUI_PYTHON=~/ComfyUI/venv/bin/python \\
        python workflows/_screenshot.py [--chromium /usr/bin/chromium] [--only NAME] [--out DIR]

It starts ComfyUI headless on loopback with this pack installed, opens the page in headless Chromium, loads the
workflow with ``app.loadGraphData`` (the frontend's own loader, so a workflow it cannot open fails here), waits for
our frontend extension to draw, and writes ``workflows/<name>.webp``. ``--out`` writes PNGs elsewhere instead
(for looking at the frontend without touching the thumbnails). Errors the page logs are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))

from comfy_harness import ComfyServer, comfyui_path  # noqa: E402


def shoot(page, url: str, workflow: dict, path: Path, size=(1600, 900), settle_ms: int = 1500) -> list[str]:
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"{exc}: {getattr(exc, 'stack', '')[:600]}"))
    page.on("console", lambda msg: errors.append(f"{msg.text} {msg.location.get('url', '')}")
            if msg.type == "error" else None)
    page.set_viewport_size({"width": size[0], "height": size[1]})
    page.goto(url, wait_until="networkidle")
    page.wait_for_function("() => window.app && window.app.graph", timeout=60_000)
    page.keyboard.press("Escape")
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    page.wait_for_timeout(settle_ms)
    page.screenshot(path=str(path))
    return errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--only", action="append")
    ap.add_argument("--out", type=Path, help="write PNG screenshots here instead of the workflow thumbnails")
    ap.add_argument("--edit", help="JSON {node_type: {widget_index: value}} applied before loading (UI checks)")
    args = ap.parse_args(argv)
    comfy = comfyui_path()
    if comfy is None:
        ap.error("set COMFYUI_PATH (and COMFYUI_PYTHON) to a ComfyUI checkout")
    from playwright.sync_api import sync_playwright

    edits = json.loads(args.edit) if args.edit else {}
    base = Path(tempfile.mkdtemp(prefix="adl_shots_"))
    settings = base / "user" / "default" / "comfy.settings.json"  # no first-run template dialog
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
                                    "Comfy.Workflow.ShowMissingNodesWarning": False}))
    server = ComfyServer(comfy, base).start()
    failures = 0
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            for wf_path in sorted(HERE.glob("*.json")):
                if args.only and wf_path.stem not in args.only:
                    continue
                workflow = json.loads(wf_path.read_text())
                for node in workflow["nodes"]:
                    for index, value in edits.get(node["type"], {}).items():
                        node["widgets_values"][int(index)] = value
                target = (args.out / f"{wf_path.stem}.png") if args.out else wf_path.with_suffix(".png")
                target.parent.mkdir(parents=True, exist_ok=True)
                page = browser.new_page()
                errors = shoot(page, server.url, workflow, target)
                page.close()
                if not args.out:  # thumbnails are small webp files
                    import cv2

                    image = cv2.imread(str(target))
                    image = cv2.resize(image, (960, 540), interpolation=cv2.INTER_AREA)
                    cv2.imwrite(str(wf_path.with_suffix(".webp")), image, [cv2.IMWRITE_WEBP_QUALITY, 85])
                    target.unlink()
                    target = wf_path.with_suffix(".webp")
                print(f"{wf_path.name} -> {target}")
                ours = [e for e in errors if "adlightning" in e]  # the frontend's own 404s and offline noise aside
                for e in ours:
                    print(f"   page error from our extension: {e}")
                print(f"   ({len(errors) - len(ours)} other console errors from the frontend itself)")
                failures += bool(ours)
            browser.close()
    finally:
        server.stop()
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
