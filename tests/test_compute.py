"""FLOPs of a training iteration (training.compute): attention counted on the CPU kernel fake tensors use,
checked against the same attention written as matrix multiplies, and the count following the iteration."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from training import compute, memory

TINY = memory.StandIn(model_channels=16, channel_mult=(1, 2), heads=2, groups=8, context_dim=16, tokens=4,
                      motion_heads=2, attention_levels=(0,))


def test_cpu_attention_counts_as_the_same_attention_written_as_matmuls():
    q = torch.randn(2, 3, 40, 8, requires_grad=True)
    k = torch.randn(2, 3, 24, 8, requires_grad=True)
    v = torch.randn(2, 3, 24, 8, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=compute._ATTENTION_ON_CPU) as fused:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    with FlopCounterMode(display=False) as explicit:
        ((q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1) @ v).sum().backward()
    assert explicit.get_total_flops() > 0
    # the same matmuls, plus the flash kernel's recomputation of the scores Q K^T in backward
    recompute = 2 * 2 * 3 * 40 * 24 * 8
    assert fused.get_total_flops() == explicit.get_total_flops() + recompute


def flops(settings, kind="mse"):
    return compute.count_flops(*memory.plan_pieces(settings, memory.Geometry(2, 8, 8), kind, "cpu", TINY))


def test_iteration_flops_follow_bases_checkpointing_and_the_discriminator():
    base = memory.PlanSettings(stage="2->1", mse_only=True, device="cpu", bases=1)
    one = flops(base)
    assert one > 0
    # each base runs the teacher's and the student's jump: twice the bases, twice the work
    assert flops(dataclasses.replace(base, bases=2)) == pytest.approx(2 * one, rel=0.02)
    # checkpointing recomputes the student's motion modules in backward: more work, same result
    assert flops(dataclasses.replace(base, checkpointing=True)) > one
    # an adversarial phase adds D's passes on top of the student's jump
    adversarial = dataclasses.replace(base, mse_only=False, stage="8->4")
    assert flops(adversarial, "conditional") > flops(dataclasses.replace(adversarial, mse_only=True))


def test_seconds_are_flops_over_the_cards_sustained_throughput():
    card = compute.Card("test card", 16, 50.0)
    assert compute.seconds_on(10 ** 13, card, utilization=0.5) == pytest.approx(0.4)
    assert [c.memory_gb for c in compute.CARDS] == sorted(c.memory_gb for c in compute.CARDS)
