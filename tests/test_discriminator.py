"""lightning.discriminator: the flow-conditional D / unconditional D' of AnimateDiff-Lightning §3.3."""

import pytest
import torch
from torch import nn

from lightning.discriminator import ConvHead, FlowDiscriminator, groups_for
from lightning.errors import InvalidInputError
from lightning.toy.critic import ToyBackbone, toy_discriminator
from lightning.toy.models import ToyBase
from lightning.toy.world import ToyWorld

K, FRAMES, DIM = 8, 8, 4 * 8 * 8


@pytest.fixture(scope="module")
def base():
    return ToyBase(ToyWorld(), 0)


def clips(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n * FRAMES, 4, 8, 8, generator=g), torch.full((n * FRAMES,), 499.0)


def test_head_reduces_sd15_mid_features_to_one_logit_on_meta():
    # SD1.5 at 512x512, 16 frames: mid features [1280, 16, 8, 8] per pass, two passes concatenated
    with torch.device("meta"):
        head = ConvHead(2 * 1280, 16, 8, 8, channels=1280)
    convs = [m for m in head.blocks if isinstance(m, nn.Conv3d)]
    assert len(convs) == 4 and all(c.kernel_size == (4, 4, 4) and c.stride == (2, 2, 2) for c in convs[:3])
    assert convs[3].kernel_size == (4, 1, 1)  # 2x1x1 -> 1x1x1: only the frame axis is still longer than one
    norms = [m for m in head.blocks if isinstance(m, nn.GroupNorm)]
    assert all(n.num_groups == 32 for n in norms)  # the UNet's 32 groups at full width
    out = head(torch.empty(2, 2 * 1280, 16, 8, 8, device="meta"))
    assert out.shape == (2,)


def test_group_count_never_leaves_single_channel_groups_on_the_final_map(base):
    assert groups_for(2560, 16) == 32 and groups_for(64, 16) == 4 and groups_for(32, 16) == 2
    # regression: with one channel per group the last 1x1x1 GroupNorm zeroed everything and D was constant
    d = toy_discriminator(False, base=base, num_bases=2)
    a, b = d(*clips(3, 1), None, 0), d(*clips(3, 2), None, 0)
    assert a.shape == (3,) and not torch.allclose(a, b)


def test_conditional_d_looks_at_both_ends_and_d_prime_only_at_the_jump(base):
    torch.manual_seed(0)
    cond_d = toy_discriminator(True, base=base, num_bases=2)
    free_d = toy_discriminator(False, base=base, num_bases=2)
    x_next, t_next = clips(2, 1)
    x_a, t = clips(2, 2)
    x_b, _ = clips(2, 3)
    with torch.no_grad():
        assert not torch.allclose(cond_d(x_next, t_next, None, 0, x_in=x_a, t=t), cond_d(x_next, t_next, None, 0, x_in=x_b, t=t))
        torch.testing.assert_close(free_d(x_next, t_next, None, 0, x_in=x_a, t=t), free_d(x_next, t_next, None, 0))
    with pytest.raises(InvalidInputError, match="needs x_in and t"):
        cond_d(x_next, t_next, None, 0)


def test_base_index_is_a_learnable_embedding_added_to_the_time_embedding(base):
    torch.manual_seed(0)
    d = toy_discriminator(True, base=base, num_bases=3)
    x_next, t_next = clips(2, 1)
    x, t = clips(2, 2)
    with torch.no_grad():
        same = [d(x_next, t_next, None, i, x_in=x, t=t) for i in range(3)]
        torch.testing.assert_close(same[0], same[2])  # zero-initialised: starts as the plain time embedding
        d.base_embedding.weight.normal_()
        differ = [d(x_next, t_next, None, i, x_in=x, t=t) for i in range(3)]
    assert not torch.allclose(differ[0], differ[2])
    per_clip = d(x_next, t_next, None, torch.tensor([0, 2]), x_in=x, t=t)  # one index per clip works too
    torch.testing.assert_close(per_clip.detach(), torch.stack([differ[0][0], differ[2][1]]))
    with pytest.raises(InvalidInputError, match="base index"):
        d(x_next, t_next, None, 3, x_in=x, t=t)


def test_every_part_of_the_discriminator_is_trained(base):
    d = toy_discriminator(True, base=base, num_bases=2)
    x_next, t_next = clips(2, 1)
    x, t = clips(2, 2)
    d(x_next, t_next, None, 1, x_in=x, t=t).sum().backward()
    missing = [name for name, p in d.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []  # backbone (templates, lift, motion module), index embedding and head all learn
    # ... and it is a trainable copy: the base it started from is untouched and gets no gradient
    assert base.templates.grad is None and not base.templates.requires_grad


def test_any_backbone_plugs_in():
    class TinyBackbone(nn.Module):
        channels, embedding_dim = 16, 8

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 16, 3, stride=2, padding=1)
            self.emb = nn.Linear(8, 16)

        def forward(self, x_in, timestep, cond, extra_embedding, video_length):
            return self.conv(x_in) + self.emb(extra_embedding + timestep[:, None] / 1000)[:, :, None, None]

    d = FlowDiscriminator(TinyBackbone(), num_bases=2, feature_size=(FRAMES, 4, 4), conditional=True)
    x_next, t_next = clips(3, 1)
    x, t = clips(3, 2)
    assert d(x_next, t_next, None, 0, x_in=x, t=t).shape == (3,)
    with pytest.raises(InvalidInputError, match="whole number"):
        d(x_next[:5], t_next[:5], None, 0, x_in=x[:5], t=t[:5])


def test_toy_backbone_starts_from_the_base_encoder_and_checks_its_inputs(base):
    b = ToyBackbone(base)
    torch.testing.assert_close(b.templates.detach(), base.templates.detach().float())
    raw = base.lift.shape[1]
    torch.testing.assert_close(b.lift.detach()[:, :raw], base.lift.detach())
    assert b.lift.shape[1] == raw + 1  # plus the template fit, a feature the base's encoder lacks
    x, t = clips(1, 0)
    assert b(x, t, None, torch.zeros(FRAMES, 32), FRAMES).shape == (FRAMES, 32, K, 1)
    with pytest.raises(InvalidInputError, match="built for 8-frame clips"):
        b(x, t, None, torch.zeros(FRAMES, 32), 4)
