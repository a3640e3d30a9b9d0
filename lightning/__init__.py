"""AnimateDiff-Lightning core: plain PyTorch, no ComfyUI.

Submodules are imported on demand (``from lightning import schedule, sampling``) so that importing the
package stays cheap and never pulls in optional dependencies.
"""

__version__ = "0.1.0"
