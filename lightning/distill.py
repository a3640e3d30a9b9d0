"""Progressive adversarial diffusion distillation of a motion module (AnimateDiff-Lightning §2.2, §3).

Read top to bottom: stage specs, the time grids, one training pair (x_t, teacher x_{t-ns}, student
x̂_{t-ns}) and the losses. The loop that runs a stage (devices, precision, accumulation, optimisers,
checkpoints) is ``training.loop``; it calls these functions and nothing else does this math.

The code never looks inside a model. It sees:

- **lanes**: one per frozen base model (what AnimateDiff-Lightning puts on its own GPU rank). A lane has a
  ``base`` callable ``base(x_in, timestep, cond, motion_module) -> eps`` whose weights stay frozen, the base
  index ``base.index`` (the flow condition the discriminator is told), a ``data(n, generator)`` source of
  clean latents with their conditioning, and the clip length.
- **the student**: the trainable motion module (any ``nn.Module``); its frozen copy is the teacher.
- **discriminators**: ``make_discriminator(conditional)`` builds a fresh one for every adversarial phase;
  called as ``d(x_next_in, t_next, cond, index)`` - the conditional D also with ``x_in=..., t=...`` (the
  jump's start) - it returns one logit per clip (see :mod:`lightning.discriminator`).

Math (notes: lightning-math.md §3.5, §4; paper eqs. 1-9):

- Student timesteps are the student's own trailing grid (999, 749, 499, 249 for 4 steps), plus the extra
  start points SDXL-Lightning found stabilising for the 2- and 1-step students (249/499/749).
- From x_t the teacher takes ``n`` Euler steps of stride ``s`` (the teacher's own trailing grid) under
  ``no_grad``; the student takes one step of stride ``n*s`` to the same end point. Both are
  :func:`lightning.sampling.move`, the sampler's only step, so training and inference integrate alike.
- At t = 999 the model input is pure noise (``sampling.initial_latent`` with ComfyUI's noise scaling),
  while predictions are still converted with the original sigma_999 (no zero-terminal-SNR rescale).
- Losses: MSE ``|x̂ - x|^2``; adversarial, non-saturating, ``L_D = -log p - log(1 - p̂)``,
  ``L_G = -log p̂`` with ``p = sigmoid(logit)``, written with softplus on logits (identical, but finite for
  confident discriminators). D and the student are updated in alternation on the same pairs.
- Everything an iteration decides in Python (start timesteps, teacher sub-steps, which clips are done) is
  Python ints, never read back from a tensor, so one iteration can be traced on fake tensors to plan memory.
- Adam; MSE lr 1e-5, betas (0.9, 0.999); adversarial lr 5e-7 (full motion-module weights, no LoRA),
  betas (0, 0.99), the same for D. Each adversarial stage runs the conditional D (sees x_t) first, then
  the unconditional D' (sees only x_{t-ns}); every phase gets a fresh discriminator.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import sampling, schedule
from .errors import InvalidInputError

MSE = "mse"
CONDITIONAL = "conditional"  # adversarial, D sees (x_t, x_{t-ns})
UNCONDITIONAL = "unconditional"  # adversarial, D' sees x_{t-ns} only
PHASE_KINDS = (MSE, CONDITIONAL, UNCONDITIONAL)

PAPER_MSE_LR = 1e-5
PAPER_MSE_BETAS = (0.9, 0.999)
PAPER_ADVERSARIAL_LR = 5e-7  # full weights; SDXL-Lightning used 1e-6 with LoRA
PAPER_ADVERSARIAL_BETAS = (0.0, 0.99)
PAPER_CFG = 7.5  # teacher guidance of the 128 -> 32 stage, no negative prompt
EXTRA_TIMESTEPS = {2: (749, 249), 1: (749, 499, 249)}  # SDXL-Lightning §3.7.1 (lightning-math §4.3)


# --- stage specs ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Phase:
    """One optimisation phase of a stage: its loss, length and Adam settings."""

    kind: str
    iterations: int
    lr: float
    betas: tuple[float, float]
    clips: int | None = None  # clips per lane per iteration; None: the loop's default (training.loop)

    def __post_init__(self):
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))  # Adam refuses mixed types
        if self.clips is not None and (not isinstance(self.clips, int) or self.clips < 1):
            raise InvalidInputError(f"phase clips must be a positive integer or None, got {self.clips!r}")
        if self.kind not in PHASE_KINDS:
            raise InvalidInputError(f"phase kind must be one of {PHASE_KINDS}, got {self.kind!r}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise InvalidInputError(f"phase iterations must be a non-negative integer, got {self.iterations!r}")
        if not self.lr > 0:
            raise InvalidInputError(f"phase lr must be positive, got {self.lr!r}")

    @property
    def adversarial(self) -> bool:
        return self.kind != MSE


def mse_phase(iterations: int, lr: float = PAPER_MSE_LR, clips: int | None = None) -> Phase:
    return Phase(MSE, iterations, lr, PAPER_MSE_BETAS, clips)


def adversarial_phase(kind: str, iterations: int, lr: float = PAPER_ADVERSARIAL_LR, clips: int | None = None) -> Phase:
    if kind not in (CONDITIONAL, UNCONDITIONAL):
        raise InvalidInputError(f"adversarial phase kind must be {CONDITIONAL!r} or {UNCONDITIONAL!r}, got {kind!r}")
    return Phase(kind, iterations, lr, PAPER_ADVERSARIAL_BETAS, clips)


@dataclasses.dataclass(frozen=True)
class Stage:
    """Distil a ``teacher_steps`` sampler into a ``student_steps`` one (``n = teacher/student`` sub-steps)."""

    teacher_steps: int
    student_steps: int
    phases: tuple[Phase, ...]
    cfg: float = 1.0  # teacher classifier-free guidance (uncond = empty prompt, no negative prompt)
    extra_timesteps: tuple[int, ...] = ()  # start points beyond the student's own grid

    def __post_init__(self):
        for name in ("teacher_steps", "student_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= schedule.NUM_TRAIN_TIMESTEPS:
                raise InvalidInputError(f"Stage.{name} must be an integer in 1..1000, got {value!r}")
        if self.teacher_steps % self.student_steps or self.teacher_steps == self.student_steps:
            raise InvalidInputError(
                f"a stage distils teacher_steps={self.teacher_steps} into fewer student_steps that divide it; "
                f"got student_steps={self.student_steps}")
        if any(not 0 <= t < schedule.NUM_TRAIN_TIMESTEPS for t in self.extra_timesteps):
            raise InvalidInputError(f"extra_timesteps must lie in 0..999, got {self.extra_timesteps}")

    @property
    def n(self) -> int:
        """Teacher steps per student step."""
        return self.teacher_steps // self.student_steps

    @property
    def stride(self) -> float:
        """The teacher's stride s in timesteps (1000 / teacher_steps); the student's is n*s."""
        return schedule.NUM_TRAIN_TIMESTEPS / self.teacher_steps

    @property
    def name(self) -> str:
        return f"{self.teacher_steps}->{self.student_steps}"

    @property
    def has_adversarial(self) -> bool:
        return any(p.adversarial for p in self.phases)


def adversarial_stage(teacher_steps: int, student_steps: int, iterations: tuple[int, int],
                      lr: float = PAPER_ADVERSARIAL_LR) -> Stage:
    """A conditional-D phase, then an unconditional-D' phase, with the extra start points for 2/1 steps."""
    return Stage(teacher_steps, student_steps,
                 (adversarial_phase(CONDITIONAL, iterations[0], lr), adversarial_phase(UNCONDITIONAL, iterations[1], lr)),
                 extra_timesteps=EXTRA_TIMESTEPS.get(student_steps, ()))


def paper_stages(*, one_step: bool = False, iterations: int = 1000) -> tuple[Stage, ...]:
    """AnimateDiff-Lightning's schedule: 128->32 MSE with CFG 7.5, then adversarial 32->8->4->2 (->1).

    The paper gives no iteration counts; ``iterations`` is a placeholder per phase.
    """
    stages = [Stage(128, 32, (mse_phase(iterations),), cfg=PAPER_CFG)]
    stages += [adversarial_stage(t, s, (iterations, iterations)) for t, s in ((32, 8), (8, 4), (4, 2))]
    if one_step:
        stages.append(adversarial_stage(2, 1, (iterations, iterations)))
    return tuple(stages)


def scale_learning_rates(stages: Iterable[Stage], factor: float) -> tuple[Stage, ...]:
    """The same stages with every lr multiplied by ``factor`` (keeps the MSE:adversarial ratio and betas)."""
    if not factor > 0:
        raise InvalidInputError(f"learning-rate factor must be positive, got {factor!r}")
    return tuple(dataclasses.replace(st, phases=tuple(dataclasses.replace(p, lr=p.lr * factor) for p in st.phases))
                 for st in stages)


# --- time grids -----------------------------------------------------------------------------------------

def student_timesteps(stage: Stage) -> list[int]:
    """Start timesteps the student trains on: its own trailing grid plus the stage's extras, noisiest first."""
    grid = set(schedule.trailing_timesteps(stage.student_steps))
    return sorted(grid | set(stage.extra_timesteps), reverse=True)


def teacher_timesteps(stage: Stage, start: int) -> list[int]:
    """The ``n + 1`` timesteps of the teacher's sub-steps from ``start``; -1 means "sigma 0" (the end).

    On the teacher's trailing grid the sub-steps are its next grid points (so the 128- and 32-step grids,
    whose strides are fractional, stay exactly nested); an extra start point off that grid steps by the
    stride, rounded as the trailing formula rounds. Anything past timestep 0 is the end of sampling.
    """
    grid = schedule.trailing_timesteps(stage.teacher_steps) + [-1]
    if start in grid[:-1]:
        i = grid.index(start)
        return [grid[min(i + k, len(grid) - 1)] for k in range(stage.n + 1)]
    out = []
    for k in range(stage.n + 1):
        t = round(start + 1 - k * stage.stride) - 1
        out.append(t if t >= 0 else -1)
    return out


def sigma_at(timesteps: torch.Tensor) -> torch.Tensor:
    """Sigma of integer timesteps (float64); -1 (the end of sampling) has sigma 0."""
    t = timesteps.to(torch.float64)
    return torch.where(t >= 0, schedule.timestep_to_sigma(t.clamp(min=0)), torch.zeros_like(t))


def model_timestep(timesteps: torch.Tensor) -> torch.Tensor:
    """The timestep a model is shown; the end of sampling (sigma 0) shows as timestep 0."""
    return timesteps.to(torch.float64).clamp(min=0)


# --- interfaces -----------------------------------------------------------------------------------------

class FrozenBase(Protocol):
    index: int

    def __call__(self, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any, motion_module: nn.Module | None
                 ) -> torch.Tensor: ...


@dataclasses.dataclass
class Lane:
    """One frozen base model and the data distilled on it (one GPU rank in the paper's Table 1).

    ``data(n, generator)`` returns ``(latents [n*frames, C, H, W], cond, uncond)``; cond/uncond are whatever
    the base takes (None in the toy world), sliced per clip by :func:`select_clips` when needed.
    """

    base: FrozenBase
    data: Callable[[int, torch.Generator], tuple[torch.Tensor, Any, Any]]
    frames: int

    @property
    def index(self) -> int:
        return int(self.base.index)


def denoiser_for(base: FrozenBase, motion_module: nn.Module | None) -> sampling.Denoiser:
    """The sampler's ``denoiser(x_in, timestep, cond)`` for a base with a motion module plugged in."""
    return lambda x_in, timestep, cond=None: base(x_in, timestep, cond, motion_module)


# --- one training pair ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Pair:
    """x_t, where the stage jumps to, and the teacher's x_{t-ns}; ``student`` is filled in when predicted."""

    x: torch.Tensor  # x_t in sigma space, [clips*frames, C, H, W]
    start: torch.Tensor  # per clip, integer timestep t
    end: torch.Tensor  # per clip, t - n*s (or -1: sigma 0)
    teacher: torch.Tensor  # x_{t-ns} from n teacher steps
    cond: Any
    index: int
    frames: int
    student: torch.Tensor | None = None

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        return values.repeat_interleave(self.frames)

    def model_input(self, x: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x / sqrt(sigma^2 + 1), the timestep the model sees) for rows at per-clip ``timesteps``."""
        rows = self.per_row(timesteps)
        return schedule.scale_model_input(x, sigma_at(rows)), model_timestep(rows)


def _start_list(starts) -> list[int]:
    """Per-clip start timesteps as Python ints (a tensor is read back, so pass a list inside a trace)."""
    return [int(t) for t in (starts.tolist() if isinstance(starts, torch.Tensor) else starts)]


# Python floats of the training sigmas: noising picks its scale per start in Python (no tensor read-back).
_TRAIN_SIGMAS: list[float] = schedule.train_sigmas().tolist()


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, starts, frames: int) -> torch.Tensor:
    """x_t per clip, built the way the sampler starts: pure noise as model input at t=999, else x0 + sigma*eps.

    ``starts``: the per-clip start timesteps (Python ints, or a tensor outside a trace).
    """
    starts = _start_list(starts)
    out = torch.empty_like(latents)
    for t in sorted(set(starts)):
        rows = torch.tensor([c * frames + f for c, s in enumerate(starts) if s == t for f in range(frames)],
                            device=latents.device)
        at_top = t >= schedule.NUM_TRAIN_TIMESTEPS - 1
        # "comfyui" scaling: from the top the model input x / sqrt(sigma^2 + 1) is exactly the noise
        value = sampling.initial_latent(noise.index_select(0, rows), (_TRAIN_SIGMAS[t],),
                                        None if at_top else latents.index_select(0, rows), noise_scaling="comfyui")
        out.index_copy_(0, rows, value)
    return out


def teacher_jump(stage: Stage, base: FrozenBase, teacher: nn.Module | None, x: torch.Tensor, starts,
                 cond: Any, uncond: Any, frames: int) -> torch.Tensor:
    """n teacher Euler steps of stride s from every clip's x_t (no gradients), with the stage's CFG."""
    steps = [teacher_timesteps(stage, t) for t in _start_list(starts)]  # per clip, n+1 Python ints
    denoiser = denoiser_for(base, teacher)
    with torch.no_grad():
        for k in range(stage.n):
            if all(s[k] < 0 for s in steps):
                break  # every clip already reached sigma 0
            now = torch.tensor([s[k] for s in steps], device=x.device).repeat_interleave(frames)
            nxt = torch.tensor([s[k + 1] for s in steps], device=x.device).repeat_interleave(frames)
            active = now >= 0  # clips that already reached sigma 0 stay put
            sigma, sigma_next = sigma_at(now), sigma_at(nxt)
            x_in = schedule.scale_model_input(x, sigma)
            eps = sampling.guided_eps(denoiser, x_in, model_timestep(now), cond, uncond, stage.cfg)
            x = torch.where(active[:, None, None, None], sampling.move(x, eps, sigma, sigma_next), x)
    return x


def student_jump(base: FrozenBase, student: nn.Module, pair: Pair) -> torch.Tensor:
    """The student's single Euler step of stride n*s from x_t (with gradients into the motion module)."""
    x_in, t = pair.model_input(pair.x, pair.start)
    eps = base(x_in, t, pair.cond, student)
    return sampling.move(pair.x, eps, sigma_at(pair.per_row(pair.start)), sigma_at(pair.per_row(pair.end)))


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake  # the memory plan traces on fake tensors

    return is_fake(tensor)


def draw_starts(stage: Stage, clips: int, generator: torch.Generator) -> list[int]:
    """A start timestep per clip, uniform over the student's grid, as Python ints.

    Under a fake-tensor trace (the memory plan) the draw has no value: every clip then starts at the top
    of the grid, where the teacher runs all its n sub-steps (the most work an iteration can do).
    """
    grid = student_timesteps(stage)
    drawn = torch.randint(len(grid), (clips,), generator=generator)
    if _is_fake(drawn):
        return [grid[0]] * clips
    return [grid[i] for i in drawn.tolist()]


def _to(value: Any, device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) and device is not None else value


def draw_pair(stage: Stage, lane: Lane, teacher: nn.Module | None, clips: int, generator: torch.Generator, *,
              device: torch.device | str | None = None) -> Pair:
    """Sample clean clips, a start timestep per clip from the student's grid, noise them, run the teacher.

    Every random draw comes from ``generator`` (a CPU generator: the same pair on any device), in the
    order data, starts, noise; ``device`` is where the pair and the teacher's jump are computed.
    """
    latents, cond, uncond = lane.data(clips, generator)
    starts = draw_starts(stage, clips, generator)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    latents, noise, cond, uncond = (_to(v, device) for v in (latents, noise, cond, uncond))
    x = noisy_latents(latents, noise, starts, lane.frames)
    ends = [teacher_timesteps(stage, t)[-1] for t in starts]
    target = teacher_jump(stage, lane.base, teacher, x, starts, cond, uncond, lane.frames)
    return Pair(x, torch.tensor(starts, device=x.device), torch.tensor(ends, device=x.device), target, cond,
                lane.index, lane.frames)


# --- losses ---------------------------------------------------------------------------------------------

def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student - teacher).square().mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``-log p - log(1 - p̂)`` with ``p = sigmoid(real)``, ``p̂ = sigmoid(fake)``: softplus(-real) + softplus(fake)."""
    return (F.softplus(-real_logits) + F.softplus(fake_logits)).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating ``-log p̂`` = softplus(-fake)."""
    return F.softplus(-fake_logits).mean()


def discriminate(discriminator: nn.Module, pair: Pair, x_next: torch.Tensor, conditional: bool) -> torch.Tensor:
    """Logits (one per clip) that ``x_next`` is the teacher's jump; only the conditional D is shown x_t."""
    next_in, next_t = pair.model_input(x_next, pair.end)
    if not conditional:
        return discriminator(next_in, next_t, pair.cond, pair.index)
    x_in, t = pair.model_input(pair.x, pair.start)
    return discriminator(next_in, next_t, pair.cond, pair.index, x_in=x_in, t=t)


def accuracy(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Fraction of teacher jumps called real and student jumps called fake (0.5 is chance), a 0-dim tensor."""
    hits = (real_logits > 0).sum() + (fake_logits < 0).sum()
    return hits.to(torch.float64) / (real_logits.numel() + fake_logits.numel())


def preference(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs (same x_t) where D scores the teacher's jump above the student's (0.5 is chance).

    Unlike :func:`accuracy` it ignores D's overall bias, so it shows what D has learned to tell apart even
    while its logits still sit on one side of zero. A 0-dim tensor (no read-back inside an iteration).
    """
    return (real_logits > fake_logits).to(torch.float64).mean()


def frozen_copy(module: nn.Module) -> nn.Module:
    """The teacher of a stage: a copy of the student as it enters the stage, frozen."""
    teacher = copy.deepcopy(module)
    teacher.requires_grad_(False)
    return teacher.eval()


def check_chain(stages: Sequence[Stage]) -> None:
    """Each stage must start where the previous one ended (its teacher is the previous student)."""
    for earlier, later in zip(stages, stages[1:]):
        if later.teacher_steps != earlier.student_steps:
            raise InvalidInputError(
                f"stage {later.name} must start where {earlier.name} ended ({earlier.student_steps} steps)")
