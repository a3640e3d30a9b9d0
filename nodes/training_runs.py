"""Run folders as the training nodes and the widget see them, without ComfyUI (so CI tests it).

A run folder is ``<runs root>/<run_name>-<YYYYmmdd-HHMMSS>[-n]`` holding ``config.toml`` (``training.run_dir``).
The widget's log route takes a folder *name* from the browser, so :func:`run_path` accepts only names of that
form that resolve to a direct child of the runs root: no separators, no ``..``, nothing outside.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ._core import core

errors = core("errors")

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
RUN_FOLDER = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,99})-(?P<stamp>\d{8}-\d{6})(?:-\d+)?$")
FIGURES = ("mse", "d", "g", "accuracy", "preference")


def check_name(name: str, what: str) -> str:
    """A run or dataset name that is safe as a folder name; raises naming ``what`` otherwise."""
    name = (name or "").strip()
    if not RUN_NAME.match(name) or ".." in name:
        raise errors.InvalidInputError(f"{what} {name!r}: use letters, digits, '_', '-' or '.', starting with a "
                                       "letter or digit (it becomes a folder name)")
    return name


def run_folders(root: Path) -> list[str]:
    """Run folder names under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and RUN_FOLDER.match(p.name) and (p / "config.toml").is_file()]
    return [p.name for p in sorted(found, key=lambda p: (RUN_FOLDER.match(p.name)["stamp"], p.name), reverse=True)]


def run_path(folder: str, root: Path) -> Path:
    """The run folder called ``folder`` directly under ``root``; anything else is refused."""
    root = Path(root).resolve()
    if not isinstance(folder, str) or "/" in folder or "\\" in folder or ".." in folder or not RUN_FOLDER.match(folder):
        raise errors.InvalidInputError(f"{folder!r} is not a run folder name")
    path = (root / folder).resolve()
    if path.parent != root or not (path / "config.toml").is_file():
        raise errors.InvalidInputError(f"no run folder {folder!r} in {root}")
    return path


def newest_run(name: str, root: Path) -> Path | None:
    for folder in run_folders(root):
        if RUN_FOLDER.match(folder)["name"] == name:
            return root / folder
    return None


def has_discriminator(path: Path) -> bool:
    """Whether the newest state of a run holds a discriminator (a run of an adversarial stage)."""
    from safetensors import safe_open

    states = sorted((path / "state").glob("iter-*.safetensors"))
    if not states:
        return False
    try:
        with safe_open(str(states[-1]), "pt") as handle:
            return any(k.startswith("discriminator.") for k in handle.keys())
    except Exception:
        return False


def read_records(path: Path) -> list[dict]:
    """Whole JSON lines of a run's ``log.jsonl`` (a line cut by a kill is skipped)."""
    out = []
    log = path / "log.jsonl"
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def log_payload(run: str | None, run_name: str | None, root: Path) -> dict:
    """What the widget reads after a page reload: a run folder's records, by folder name or the newest run of a
    run name."""
    if run:
        path = run_path(run, root)
    else:
        path = newest_run(check_name(run_name or "", "run_name"), Path(root))
        if path is None:
            return {"run": None, "records": []}
    return {"run": path.name, "records": read_records(path)}


def curves_image(records: list[dict], width: int = 768, height: int = 480) -> np.ndarray:
    """Loss (MSE, or D and G), D accuracy and D preference over iterations, as an RGB uint8 array."""
    rows = [r for r in records if "event" not in r and isinstance(r.get("iteration"), (int, float))
            and any(k in r for k in FIGURES)]
    panels = [("loss", ("mse", "d", "g"), None), ("D accuracy", ("accuracy",), (0.0, 1.0)),
              ("D preference", ("preference",), (0.0, 1.0))]
    colours = {"mse": (90, 170, 255), "d": (255, 120, 90), "g": (120, 220, 120), "accuracy": (255, 200, 80),
               "preference": (200, 140, 255)}
    image = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(image)
    panel_h = height // len(panels)
    xs = [r["iteration"] for r in rows]
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0, 1)
    for p, (title, keys, fixed) in enumerate(panels):
        top, left, right, bottom = p * panel_h + 18, 48, width - 12, (p + 1) * panel_h - 8
        draw.rectangle([left, top, right, bottom], outline=(80, 80, 90))
        values = [r[k] for r in rows for k in keys if k in r and math.isfinite(r[k])]
        if fixed:
            lo, hi = fixed
            mid = (top + bottom) // 2
            draw.line([left, mid, right, mid], fill=(60, 60, 70))  # chance
        else:
            lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
            if hi - lo < 1e-12:
                lo, hi = lo - 0.5, hi + 0.5
        shown = [k for k in keys if any(k in r for r in rows)]
        draw.text((left, top - 15), f"{title}  {' '.join(shown)}", fill=(220, 220, 220))
        draw.text((4, top), f"{hi:.3g}", fill=(160, 160, 160))
        draw.text((4, bottom - 10), f"{lo:.3g}", fill=(160, 160, 160))
        for k in keys:
            pts = [(r["iteration"], r[k]) for r in rows if k in r and math.isfinite(r[k])]
            xy = [(left + (right - left) * ((x - x_lo) / max(x_hi - x_lo, 1)),
                   bottom - (bottom - top) * ((y - lo) / (hi - lo))) for x, y in pts]
            if len(xy) > 1:
                draw.line(xy, fill=colours[k], width=2)
            for x, y in xy:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colours[k])
    if not rows:
        draw.text((width // 2 - 60, height // 2), "no iterations yet", fill=(200, 200, 200))
    return np.asarray(image)


def no_validation_image() -> np.ndarray:
    image = Image.new("RGB", (256, 64), (24, 24, 28))
    ImageDraw.Draw(image).text((8, 24), "no validation yet (validate_every)", fill=(200, 200, 200))
    return np.asarray(image)
