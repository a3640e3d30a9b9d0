"""``kind = "toy"``: a :class:`~training.loop.Setup` from the toy world of :mod:`lightning.toy`.

The toy world's bases are styles (``model.bases = [0, 1, 2]``; empty means those three), each with its exact
frozen base; the student is a fresh (zero-initialised, so exactly the teacher) toy motion module; the
discriminators are the toy D / D'. Everything is built by the toy demo's own builders, so a config run and
``python -m lightning.toy`` train the same models. ``decode`` is the demo's fixed colour map.
"""

from __future__ import annotations

import torch

from .config import Config
from .loop import Setup
from ._core import core

DEFAULT_STYLES = (0, 1, 2)


def build(config: Config, *, materialize: bool = True) -> Setup:
    """The toy setup for ``config``; ``materialize=False`` puts every module on the meta device (no weights)."""
    demo = core("toy.demo")

    styles = tuple(int(s) for s in config.model.bases) or DEFAULT_STYLES
    demo_config = demo.DemoConfig(seed=config.run.seed, seen_styles=styles, held_out_styles=())
    world, bases, lanes, student = demo.build(demo_config)
    make_discriminator = demo.discriminator_factory(world, bases, world.config.styles)
    frames = world.config.frames
    # a toy base's index is its style id (what the discriminator's base embedding is indexed by)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(demo.to_rgb(latents, frames)[0]).float() / 255.0

    if not materialize:
        student = student.to("meta")
        for base in bases.values():
            base.to("meta")
        meta_make = make_discriminator

        def make_discriminator(conditional: bool):
            return meta_make(conditional).to("meta")

    return Setup(lanes=list(lanes), student=student, teacher=None, make_discriminator=make_discriminator,
                 decode=decode, validation_conds=[(None, None)] * len(lanes))
