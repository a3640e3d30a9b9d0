"""Turns our plain node specs into ComfyUI V3 schemas (``comfy_api.v0_0_2``, the versioned API we pin to)."""

from __future__ import annotations

from typing import Callable

from comfy_api.v0_0_2 import io

from .specs import In, NodeSpec, Out

_BUILTIN = {
    "MODEL": io.Model, "LATENT": io.Latent, "CONDITIONING": io.Conditioning, "SIGMAS": io.Sigmas,
    "IMAGE": io.Image, "MASK": io.Mask, "CONTROL_NET": io.ControlNet, "VAE": io.Vae, "CLIP": io.Clip,
    "SAMPLER": io.Sampler, "NOISE": io.Noise, "GUIDER": io.Guider, "VIDEO": io.Video, "INT": io.Int,
    "FLOAT": io.Float, "STRING": io.String, "BOOLEAN": io.Boolean,
}
_CUSTOM: dict[str, type] = {}


def socket_type(name: str):
    if name in _BUILTIN:
        return _BUILTIN[name]
    if name not in _CUSTOM:
        _CUSTOM[name] = io.Custom(name)
    return _CUSTOM[name]


def _input(spec: In, resolve_options: Callable[[str], list[str]], extra: dict | None = None):
    made = _widget(spec, resolve_options)
    if extra:
        # extra keys travel with the input in /object_info, where the frontend extension reads them
        made.extra_dict = {**(getattr(made, "extra_dict", None) or {}), **extra}
    return made


def _widget(spec: In, resolve_options: Callable[[str], list[str]]):
    common = {"display_name": spec.display_name, "optional": spec.optional, "tooltip": spec.tooltip}
    if spec.type == "INT":
        return io.Int.Input(spec.id, default=spec.default, min=spec.min, max=spec.max, step=spec.step,
                            control_after_generate=spec.control_after_generate or None, **common)
    if spec.type == "FLOAT":
        return io.Float.Input(spec.id, default=spec.default, min=spec.min, max=spec.max, step=spec.step, **common)
    if spec.type == "BOOLEAN":
        return io.Boolean.Input(spec.id, default=spec.default, **common)
    if spec.type == "STRING":
        return io.String.Input(spec.id, default=spec.default, **common)
    if spec.type == "COMBO":
        options = resolve_options(spec.options) if isinstance(spec.options, str) else list(spec.options)
        default = spec.default if spec.default in options else (options[0] if options else None)
        return io.Combo.Input(spec.id, options=options, default=default, **common)
    return socket_type(spec.type).Input(spec.id, **common)


def _output(spec: Out):
    return socket_type(spec.type).Output(display_name=spec.name, tooltip=spec.tooltip)


def build_schema(spec: NodeSpec, resolve_options: Callable[[str], list[str]] = lambda key: [],
                 extras: dict[str, dict] | None = None) -> io.Schema:
    """``extras`` maps input ids to JSON-able data sent along with that input's schema."""
    extras = extras or {}
    return io.Schema(
        node_id=spec.node_id,
        display_name=spec.display_name,
        category=spec.category,
        description=spec.description,
        inputs=[_input(i, resolve_options, extras.get(i.id)) for i in spec.inputs],
        outputs=[_output(o) for o in spec.outputs],
        is_output_node=spec.is_output_node,
        is_experimental=spec.experimental,
    )
