"""The MOTION_LORA chain: which motion LoRA files to merge, at which strength, in order.

Same shape as AnimateDiff-Evolved's chain (``.loras`` of entries with ``.name``, ``.strength``, ``.hash`` and
``clone()``), so a chain built by either pack's loader can feed either pack's apply node.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MotionLoraEntry:
    name: str
    strength: float = 0.8
    hash: str = ""

    def clone(self) -> "MotionLoraEntry":
        return MotionLoraEntry(self.name, self.strength, self.hash)


@dataclass
class MotionLoraChain:
    loras: list = field(default_factory=list)

    def add_lora(self, lora) -> None:
        self.loras.append(lora)

    def clone(self) -> "MotionLoraChain":
        return MotionLoraChain([entry.clone() for entry in self.loras])


def extend(previous, name: str, strength: float) -> MotionLoraChain:
    """A new chain: ``previous`` (ours, Evolved's, or None) plus one more LoRA; ``previous`` is not changed."""
    chain = MotionLoraChain([MotionLoraEntry(e.name, float(e.strength), getattr(e, "hash", "") or "")
                             for e in (getattr(previous, "loras", None) or [])])
    chain.add_lora(MotionLoraEntry(name, float(strength)))
    return chain


def entries(chain) -> list:
    """(name, strength) pairs of any chain-like object; an empty list for None."""
    return [(e.name, float(e.strength)) for e in (getattr(chain, "loras", None) or [])]
