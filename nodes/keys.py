"""The names under which the pack keeps its state on ComfyUI objects, in one place.

``motion_patch`` and ``context_windows`` both read what the other wrote (the context settings, the clip length
of a call, the motion attachment); they import the names from here instead of from each other. Every name is
ours alone: never AnimateDiff-Evolved's ``"ADE"``, so both packs can be installed side by side.
"""

#: attachments, additional models, injections and wrappers of an applied motion module
MOTION = "adl_motion"
#: ``transformer_options`` entry with the per-clone motion settings (the motion scale)
MOTION_OPTIONS = "adl_motion_options"
#: ``transformer_options`` entry set by our context windows when a model call holds several windows: frames per clip
VIDEO_LENGTH = "adl_video_length"
#: ``transformer_options`` entry: the frame index lists of the windows in the current model call, in row order
CONTEXT_WINDOWS = "adl_context_windows"
#: ``model_options`` entry (and wrapper key) set by the Context Windows node
CONTEXT = "adl_context"
#: AnimateDiff-Evolved's key, read only to refuse a MODEL that already carries its motion module
EVOLVED = "ADE"
#: websocket event that carries a run-time warning to the browser
WARNING_EVENT = "adlightning.warning"
