"""Where AnimateDiff's temporal modules go in ComfyUI's SD1.5 UNet, and putting them there and back.

AnimateDiff puts one temporal module after the spatial transformer of every down/up block stage (after the
ResBlock where a stage has no transformer), before the Upsample of output blocks 2, 5 and 8, and after the
middle block's transformer. In ComfyUI's ldm UNet those stages are the ``TimestepEmbedSequential`` entries of
``input_blocks``, ``middle_block`` and ``output_blocks``, so the rule per entry is: after the last
SpatialTransformer, else after the first ResBlock, else nowhere (conv_in, Downsample). That yields input blocks
1, 2, 4, 5, 7, 8, 10, 11 (the 8 down modules), the middle block (v2's mid module) and all 12 output blocks.

Layers are recognised by class name so that this module needs no ComfyUI import and can be tested with plain
``nn.Sequential`` stand-ins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.nn as nn


def layer_kind(layer: nn.Module) -> str:
    names = {cls.__name__ for cls in type(layer).__mro__}
    if "SpatialTransformer" in names:
        return "transformer"
    if "ResBlock" in names:
        return "resblock"
    return "other"


def insertion_index(layers: Sequence[nn.Module]) -> int | None:
    """Index at which a temporal module goes into one UNet stage, or None if the stage gets none."""
    kinds = [layer_kind(layer) for layer in layers]
    if "transformer" in kinds:
        return len(kinds) - kinds[::-1].index("transformer")
    if "resblock" in kinds:
        return kinds.index("resblock") + 1
    return None


@dataclass(frozen=True)
class MotionInjection:
    """Inserts a motion module set's temporal modules into a UNet and removes exactly those again.

    ``inject``/``eject`` take the UNet (ComfyUI's ``diffusion_model``); ComfyUI calls them through
    ``PatcherInjection`` when the patched model is loaded for sampling and when it is unloaded, so the shared
    base model never keeps a module after its clone is done with it. Nothing is remembered between the two:
    our modules are found again by identity, so clones sharing this object cannot disagree about its state.
    """

    down: tuple[nn.Module, ...]
    mid: nn.Module | None
    up: tuple[nn.Module, ...]

    @classmethod
    def for_module_set(cls, module_set) -> "MotionInjection":
        return cls(tuple(m for level in module_set.down for m in level), module_set.mid,
                   tuple(m for level in module_set.up for m in level))

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        return self.down + ((self.mid,) if self.mid is not None else ()) + self.up

    def targets(self, unet: nn.Module) -> list[tuple[nn.Sequential, int, nn.Module]]:
        """(stage, index, module) for every insertion, checked against the module counts."""
        plan = []
        for name, stages, modules in (("input_blocks", unet.input_blocks, self.down),
                                      ("output_blocks", unet.output_blocks, self.up)):
            slots = [(stage, idx) for stage in stages if (idx := insertion_index(list(stage))) is not None]
            if len(slots) != len(modules):
                raise ValueError(f"the UNet's {name} have {len(slots)} places for temporal modules but the motion "
                                 f"module brings {len(modules)}; this UNet does not have the SD1.5 layout")
            plan += [(stage, idx, m) for (stage, idx), m in zip(slots, modules)]
        if self.mid is not None:
            idx = insertion_index(list(unet.middle_block))
            if idx is None:
                raise ValueError("the UNet's middle block has no transformer or ResBlock for the mid motion module")
            plan.append((unet.middle_block, idx, self.mid))
        return plan

    def injected_into(self, unet: nn.Module) -> bool:
        ours = {id(m) for m in self.modules}
        return any(id(layer) in ours for stage in _stages(unet) for layer in stage)

    def inject(self, unet: nn.Module) -> None:
        if self.injected_into(unet):
            return
        for stage, idx, module in self.targets(unet):  # at most one module per stage, so indices stay valid
            stage.insert(idx, module)

    def eject(self, unet: nn.Module) -> None:
        ours = {id(m) for m in self.modules}
        for stage in _stages(unet):
            for i in reversed(range(len(stage))):
                if id(stage[i]) in ours:
                    del stage[i]


def _stages(unet: nn.Module) -> list[nn.Sequential]:
    return [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
