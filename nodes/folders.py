"""The model folders the pack reads, registered the way AnimateDiff-Evolved registers them.

Same folder names (``animatediff_models``, ``animatediff_motion_lora``), same default locations under
``ComfyUI/models``, every extension ComfyUI knows for weights: files users already have and their
``extra_model_paths.yaml`` entries just work, and with both packs installed each sees the same files.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

MOTION_MODULES = "animatediff_models"
MOTION_LORAS = "animatediff_motion_lora"
FOLDERS = (MOTION_MODULES, MOTION_LORAS)


def register(folder_paths) -> None:
    """Add our folders to ComfyUI's ``folder_paths`` (passed in, so this is testable with a stand-in)."""
    for name in FOLDERS:
        default = os.path.join(folder_paths.models_dir, name)
        folder_paths.add_model_folder_path(name, default)
        paths, extensions = folder_paths.folder_names_and_paths[name]
        # an empty set means "every file"; once anything is in it only those extensions are listed
        extensions.update(folder_paths.supported_pt_extensions)
        try:
            os.makedirs(default, exist_ok=True)
        except OSError as exc:  # a read-only install still loads files from other registered paths
            log.warning("could not create %s: %s", default, exc)


def download_dir(folder_paths) -> str:
    """Where released motion modules are downloaded to: ComfyUI/models/animatediff_models."""
    return os.path.join(folder_paths.models_dir, MOTION_MODULES)
