"""lightning.distill: stage specs, grids, the training pair and the losses (the loop: tests/test_loop.py).

The grids are checked against diffusers' trailing EulerDiscreteScheduler and lightning-math §4.3, the
teacher/student jumps against diffusers' Euler steps, the losses against -log(sigmoid) written out.
"""

import math

import pytest
import torch
from torch import nn

from lightning import distill, schedule
from lightning.errors import InvalidInputError

FRAMES = 2
SHAPE = (4, 4, 4)


def diffusers_scheduler(steps):
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="linear", timestep_spacing="trailing", prediction_type="epsilon")
    sched.set_timesteps(steps)
    return sched


class Nudge(nn.Module):
    """A stand-in motion module: adds a learnable multiple of x_in to eps."""

    def __init__(self, value=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(float(value)))


class AnalyticBase:
    """A frozen 'base' with a smooth, time-dependent eps; the motion module (if any) adds weight * x_in."""

    def __init__(self, index=0):
        self.index = index
        self.calls = []

    def __call__(self, x_in, timestep, cond=None, motion_module=None):
        self.calls.append(timestep.clone())
        t = timestep.to(x_in.dtype).reshape(-1, 1, 1, 1)
        eps = torch.tanh(x_in) * (0.5 + t / 2000.0) + 0.1 * torch.sin(3 * x_in)
        if cond is not None:
            eps = eps + cond
        if motion_module is not None:
            eps = eps + motion_module.weight * x_in
        return eps


def test_student_grids_match_the_notes_table():
    stages = {st.name: st for st in distill.paper_stages(one_step=True)}
    assert distill.student_timesteps(stages["32->8"]) == [999, 874, 749, 624, 499, 374, 249, 124]
    assert distill.student_timesteps(stages["8->4"]) == [999, 749, 499, 249]
    assert distill.student_timesteps(stages["4->2"]) == [999, 749, 499, 249]  # 999, 499 + SDXL-L extras
    assert distill.student_timesteps(stages["2->1"]) == [999, 749, 499, 249]  # 999 + extras
    grid32 = distill.student_timesteps(stages["128->32"])
    assert grid32[:5] == [999, 968, 937, 905, 874] and grid32[-3:] == [93, 61, 30]


@pytest.mark.parametrize("teacher_steps,student_steps", [(128, 32), (32, 8), (8, 4), (4, 2), (2, 1)])
def test_teacher_substeps_walk_the_teachers_own_grid(teacher_steps, student_steps):
    stage = distill.Stage(teacher_steps, student_steps, (distill.mse_phase(1),))
    teacher_grid = [int(t) for t in diffusers_scheduler(teacher_steps).timesteps.tolist()] + [-1]
    student_grid = [int(t) for t in diffusers_scheduler(student_steps).timesteps.tolist()] + [-1]
    n = teacher_steps // student_steps
    for i, start in enumerate(student_grid[:-1]):
        steps = distill.teacher_timesteps(stage, start)
        assert steps == teacher_grid[i * n: i * n + n + 1]
        assert steps[-1] == student_grid[i + 1]  # the student's one jump lands on its own next grid point


def test_extra_start_points_step_by_the_stride_and_stop_at_sigma_zero():
    four_to_two, two_to_one = distill.paper_stages(one_step=True)[3:]
    assert distill.teacher_timesteps(four_to_two, 749) == [749, 499, 249]
    assert distill.teacher_timesteps(four_to_two, 249) == [249, -1, -1]
    assert distill.teacher_timesteps(two_to_one, 749) == [749, 249, -1]  # off the 2-step grid: stride 500
    assert distill.teacher_timesteps(two_to_one, 249) == [249, -1, -1]
    assert distill.teacher_timesteps(two_to_one, 999) == [999, 499, -1]
    assert distill.sigma_at(torch.tensor([-1, 999])).tolist() == [0.0, pytest.approx(25.146116, abs=1e-5)]


def test_paper_stage_settings():
    stages = distill.paper_stages()
    assert [st.name for st in stages] == ["128->32", "32->8", "8->4", "4->2"]
    first = stages[0]
    assert first.cfg == 7.5 and [p.kind for p in first.phases] == ["mse"]
    assert first.phases[0].lr == 1e-5 and first.phases[0].betas == (0.9, 0.999)
    for st in stages[1:]:
        assert st.cfg == 1.0
        assert [p.kind for p in st.phases] == ["conditional", "unconditional"]
        assert all(p.lr == 5e-7 and p.betas == (0.0, 0.99) for p in st.phases)
    assert stages[3].extra_timesteps == (749, 249)
    one = distill.paper_stages(one_step=True)[-1]
    assert one.name == "2->1" and one.extra_timesteps == (749, 499, 249)
    scaled = distill.scale_learning_rates(stages, 100.0)
    assert scaled[0].phases[0].lr / scaled[1].phases[0].lr == pytest.approx(20.0)
    assert scaled[1].phases[0].betas == (0.0, 0.99)


@pytest.mark.parametrize("teacher,student", [(8, 3), (4, 4), (0, 1)])
def test_bad_stages_are_refused(teacher, student):
    with pytest.raises(InvalidInputError):
        distill.Stage(teacher, student, (distill.mse_phase(1),))


def test_pure_noise_is_the_model_input_at_999_and_forward_noising_below():
    x0 = torch.randn(3 * FRAMES, *SHAPE)
    noise = torch.randn(3 * FRAMES, *SHAPE)
    starts = torch.tensor([999, 499, 999])
    x = distill.noisy_latents(x0, noise, starts, FRAMES)
    sig_top = schedule.sigma_max()
    top = x[:FRAMES] / math.sqrt(sig_top ** 2 + 1)
    torch.testing.assert_close(top, noise[:FRAMES])  # no trace of x0 in the model input
    sig = float(schedule.timestep_to_sigma(torch.tensor(499.0)))
    torch.testing.assert_close(x[FRAMES:2 * FRAMES], x0[FRAMES:2 * FRAMES] + sig * noise[FRAMES:2 * FRAMES])


@pytest.mark.parametrize("stage_index", [1, 2, 3])
def test_teacher_and_student_jumps_equal_diffusers_euler(stage_index):
    stage = distill.paper_stages()[stage_index]
    base = AnalyticBase()
    student = Nudge(0.05)
    teacher_sched = diffusers_scheduler(stage.teacher_steps)
    student_sched = diffusers_scheduler(stage.student_steps)
    for i, start in enumerate(int(t) for t in student_sched.timesteps.tolist()):
        x = torch.randn(FRAMES, *SHAPE, dtype=torch.float64) * 3
        starts = torch.tensor([start])
        target = distill.teacher_jump(stage, base, None, x, starts, None, None, FRAMES)
        # diffusers: n Euler steps from grid index i*n of the teacher's schedule
        teacher_sched.set_begin_index(i * stage.n)
        teacher_sched._step_index = None
        y = x.clone()
        for k in range(stage.n):
            t = teacher_sched.timesteps[i * stage.n + k]
            eps = base(teacher_sched.scale_model_input(y, t), t.expand(FRAMES).to(torch.float64))
            y = teacher_sched.step(eps, t, y).prev_sample
        torch.testing.assert_close(target, y, rtol=1e-5, atol=1e-5)

        end = torch.tensor([distill.teacher_timesteps(stage, start)[-1]])
        pair = distill.Pair(x, starts, end, target, None, 0, FRAMES)
        jump = distill.student_jump(base, student, pair)
        student_sched.set_begin_index(i)
        student_sched._step_index = None
        t = student_sched.timesteps[i]
        eps = base(student_sched.scale_model_input(x, t), t.expand(FRAMES).to(torch.float64), None, student)
        torch.testing.assert_close(jump, student_sched.step(eps, t, x.clone()).prev_sample, rtol=1e-5, atol=1e-5)


def test_teacher_uses_cfg_with_the_uncond_branch():
    stage = distill.Stage(8, 4, (distill.mse_phase(1),), cfg=7.5)
    base = AnalyticBase()
    x = torch.randn(FRAMES, *SHAPE, dtype=torch.float64)
    cond, uncond = torch.full_like(x, 0.2), torch.zeros_like(x)
    got = distill.teacher_jump(stage, base, None, x, torch.tensor([499]), cond, uncond, FRAMES)
    # by hand: eps = eps_u + 7.5 (eps_c - eps_u) = eps_u + 7.5 * 0.2 for this base
    y = x.clone()
    for t, t_next in zip([499, 374], [374, 249]):
        s, s_next = (float(schedule.timestep_to_sigma(torch.tensor(float(v)))) for v in (t, t_next))
        x_in = y / math.sqrt(s * s + 1)
        eps = base(x_in, torch.full((FRAMES,), float(t), dtype=torch.float64)) + 7.5 * 0.2
        y = y + (s_next - s) * eps
    torch.testing.assert_close(got, y)


def test_losses_are_the_non_saturating_gan_losses():
    real, fake = torch.tensor([2.0, -0.5, 0.3]), torch.tensor([-1.0, 0.7, 0.0])
    p, p_hat = torch.sigmoid(real), torch.sigmoid(fake)
    torch.testing.assert_close(distill.discriminator_loss(real, fake), (-torch.log(p) - torch.log(1 - p_hat)).mean())
    torch.testing.assert_close(distill.generator_loss(fake), (-torch.log(p_hat)).mean())
    # confident discriminators: the naive formula overflows to inf, the logit form stays exact
    assert torch.isinf(-torch.log(1 - torch.sigmoid(torch.tensor(100.0))))
    assert distill.discriminator_loss(torch.tensor([100.0]), torch.tensor([100.0])).item() == pytest.approx(100.0)
    assert distill.generator_loss(torch.tensor([-100.0])).item() == pytest.approx(100.0)
    assert float(distill.accuracy(real, fake)) == pytest.approx(3 / 6)  # 2 real above 0, 1 fake below 0
