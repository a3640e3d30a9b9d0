"""The ComfyExtension ComfyUI gets from ``comfy_entrypoint``: folder registration and the node list."""

from __future__ import annotations

import folder_paths
from comfy_api.v0_0_2 import ComfyExtension, io

from . import folders


class LightningExtension(ComfyExtension):
    def __init__(self):
        # ComfyUI 0.3.x does not call on_load yet, so register while the loader builds the extension; the
        # node schemas (with their file lists) are only read after this.
        folders.register(folder_paths)

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .generation import NODES as generation
        from .long_video import NODES as long_video
        from .discriminator_preview import NODES as preview
        from .training_nodes import NODES as training_nodes

        return [*generation, *long_video, *training_nodes, *preview]
