"""ComfyUI entry point of the AnimateDiff-Lightning node pack.

ComfyUI imports this file as a package when it loads ``custom_nodes``; plain Python (tests, scripts) may
import it too, so nothing here touches ComfyUI until ComfyUI calls ``comfy_entrypoint``.
"""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    from .nodes.extension import LightningExtension

    return LightningExtension()
