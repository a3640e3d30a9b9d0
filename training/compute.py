"""Compute of one training iteration: floating-point operations counted on the memory plan's fake-tensor
trace, and the seconds they come to on a card at a stated sustained throughput.

The count runs the same iteration as :mod:`training.memory` (the loop's own ``train_iteration`` on the
run's modules built on ``meta``) under ``FakeTensorMode`` and PyTorch's ``FlopCounterMode``: matrix
multiplies, convolutions and attention, forward and backward, gradient-checkpointing recomputation included.
Element-wise work (norms, activations, the optimizer step) is not counted; in a UNet it is a few per cent of
the FLOPs but more of the time, which the utilisation below absorbs.

Seconds are an estimate, not a measurement: FLOPs / (the card's dense bf16 tensor throughput with fp32
accumulation, from its spec sheet, x :data:`UTILIZATION`). Replace it with the seconds a run on the card
prints (the progress bar and the run's log record each iteration's time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch._subclasses import FakeTensorMode
from torch.utils import flop_counter

#: Share of the spec-sheet tensor throughput a bf16 UNet training step sustains; an assumption (30-50 % is
#: what convolution-heavy training usually reaches on consumer cards), to be replaced by measurements.
UTILIZATION = 0.4


@dataclasses.dataclass(frozen=True)
class Card:
    name: str
    memory_gb: int
    bf16_tflops: float  # dense tensor-core bf16 with fp32 accumulation, spec sheet


#: Cards people distil on, by memory size (spec-sheet dense bf16 / fp32-accumulate tensor TFLOPS).
CARDS = (Card("RTX 3060", 12, 25.6), Card("RTX 4060 Ti 16 GB", 16, 44.1), Card("RTX 3090", 24, 71.0),
         Card("RTX 4090", 24, 165.2))


def _cpu_flash_attention(query, key, value, *args, out_val=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# PyTorch counts the GPU attention kernels but not the CPU one that fake CPU tensors dispatch to
_ATTENTION_ON_CPU = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward,
}


def count_flops(build: Callable, make_optimizers: Callable, iteration: Callable) -> int:
    """FLOPs of ``iteration(modules, optimizers)`` on fake tensors (the same pieces the memory plan traces:
    ``training.memory.plan_pieces``); nothing real is allocated."""
    modules = build()
    with FakeTensorMode(allow_non_fake_inputs=True):
        for module in modules.values():
            module.to_empty(device="cpu")
        optimizers = make_optimizers(modules)
        with flop_counter.FlopCounterMode(display=False, custom_mapping=_ATTENTION_ON_CPU) as counter:
            iteration(modules, optimizers)
    return int(counter.get_total_flops())


def seconds_on(flops: int, card: Card, utilization: float = UTILIZATION) -> float:
    """Estimated seconds for ``flops`` on ``card`` at ``utilization`` of its spec-sheet throughput."""
    return flops / (card.bf16_tflops * 1e12 * utilization)
