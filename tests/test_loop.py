"""training.loop: one iteration is lightning.distill's math; swapping bases, micro-batches and checkpointing
change nothing; the iteration traces on fake tensors; stages run their phases with fresh discriminators."""

import copy
import math

import pytest
import torch
from torch import nn
from torch._subclasses import FakeTensorMode
from torch._subclasses.fake_tensor import DataDependentOutputException

from lightning import distill
from lightning.errors import InvalidInputError
from training import loop
from training.placement import Placement

FRAMES = 2
SHAPE = (4, 4, 4)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Nudge(nn.Module):
    """A stand-in motion module: adds a learnable multiple of x_in (and of its square) to eps."""

    def __init__(self, value=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([float(value), 0.5 * float(value)]))


class Base(nn.Module):
    """A frozen base with a smooth, time-dependent eps; the motion module (if any) adds its terms.

    ``moves`` (set by a test) says whether the base must be "on the device" when it runs.
    """

    def __init__(self, index=0):
        super().__init__()
        self.index = index
        self.scale = nn.Parameter(torch.tensor(0.5 + 0.1 * index), requires_grad=False)
        self.calls = []
        self.resident = None

    def forward(self, x_in, timestep, cond=None, motion_module=None):
        if self.resident is not None:
            assert self.resident(self), "a swapped base ran while it was not on the device"
        self.calls.append(timestep)
        t = timestep.to(x_in.dtype).reshape(-1, 1, 1, 1)
        eps = torch.tanh(x_in) * (self.scale + t / 2000.0) + 0.1 * torch.sin(3 * x_in)
        if motion_module is not None:
            eps = eps + motion_module.weight[0] * x_in + motion_module.weight[1] * x_in.square()
        return eps


class Critic(nn.Module):
    """A tiny discriminator: a learnable projection of the jump (and of x_t when conditional)."""

    def __init__(self, conditional):
        super().__init__()
        self.conditional = conditional
        self.w = nn.Parameter(torch.tensor([0.3, -0.2]))
        self.head = nn.Linear(2, 1)
        self.embedding = nn.Embedding(2, 2)
        self.saw_start = []

    def forward(self, x_next_in, t_next, cond, index, *, x_in=None, t=None):
        self.saw_start.append(x_in is not None)
        flat = x_next_in.float().reshape(-1, FRAMES * math.prod(SHAPE))
        feats = torch.stack([self.w[0] * flat.mean(1), self.w[1] * flat.square().mean(1)], 1)
        feats = feats + self.embedding(torch.tensor(index)) + 1e-3 * t_next.float().reshape(-1, FRAMES)[:, :1]
        if self.conditional:
            feats = feats + 0.1 * x_in.float().reshape(-1, FRAMES * math.prod(SHAPE)).mean(1, keepdim=True)
        return self.head(feats).squeeze(1)


def make_lane(base):
    def data(n, generator):
        return torch.randn(n * FRAMES, *SHAPE, generator=generator), None, None

    return distill.Lane(base, data, FRAMES)


def adam_by_hand(param, grad, lr, betas, eps=1e-8):
    """The first Adam step from zero state (bias-corrected): lr * m_hat / (sqrt(v_hat) + eps)."""
    b1, b2 = betas
    m, v = (1 - b1) * grad, (1 - b2) * grad * grad
    m_hat, v_hat = m / (1 - b1), v / (1 - b2)
    return param - lr * m_hat / (v_hat.sqrt() + eps)


STAGE = distill.Stage(8, 4, (distill.mse_phase(1, 1e-2), distill.adversarial_phase("conditional", 1, 1e-2),
                             distill.adversarial_phase("unconditional", 1, 1e-2)))


# --- one iteration is the math of lightning.distill ----------------------------------------------------

@pytest.mark.parametrize("micro_batch", [3, 1])
def test_mse_iteration_equals_distills_math(micro_batch):
    lanes = [make_lane(Base(0)), make_lane(Base(1))]
    student, phase = Nudge(0.05), STAGE.phases[0]
    teacher = distill.frozen_copy(student)
    expected = copy.deepcopy(student)
    # by hand: per lane and micro-batch, draw_pair + student_jump + mse_loss, each weighted by its share
    gen = torch.Generator().manual_seed(7)
    mse = 0.0
    for lane in lanes:
        for _ in range(3 // micro_batch):
            pair = distill.draw_pair(STAGE, lane, teacher, micro_batch, gen)
            pair.student = distill.student_jump(lane.base, expected, pair)
            loss = distill.mse_loss(pair.student, pair.teacher) * (micro_batch / 3) / len(lanes)
            loss.backward()
            mse += float(loss.detach())
    with torch.no_grad():
        want = adam_by_hand(expected.weight, expected.weight.grad, phase.lr, phase.betas)

    optimizer = loop.make_optimizer(student.parameters(), phase)
    figures = loop.train_iteration(STAGE, phase, lanes, student, teacher, optimizer,
                                   generator=torch.Generator().manual_seed(7), clips=3, micro_batch=micro_batch)
    torch.testing.assert_close(student.weight.detach(), want, rtol=1e-6, atol=1e-9)
    assert float(figures["mse"]) == pytest.approx(mse, rel=1e-6)
    assert not torch.equal(student.weight, teacher.weight)


@pytest.mark.parametrize("kind", ["conditional", "unconditional"])
def test_adversarial_iteration_equals_distills_math(kind):
    phase = STAGE.phases[1 if kind == "conditional" else 2]
    conditional = kind == "conditional"
    lanes = [make_lane(Base(0)), make_lane(Base(1))]
    student, teacher = Nudge(0.05), Nudge(0.0)
    torch.manual_seed(3)
    disc = Critic(conditional)
    want_student, want_disc = copy.deepcopy(student), copy.deepcopy(disc)

    # by hand: D's loss over both lanes' pairs, D's Adam step, then G's loss through the updated D
    gen = torch.Generator().manual_seed(11)
    pairs = [distill.draw_pair(STAGE, lane, teacher, 2, gen) for lane in lanes]
    for lane, pair in zip(lanes, pairs):
        pair.student = distill.student_jump(lane.base, want_student, pair)
    d_total = 0.0
    for pair in pairs:
        real = distill.discriminate(want_disc, pair, pair.teacher, conditional)
        fake = distill.discriminate(want_disc, pair, pair.student.detach(), conditional)
        loss = distill.discriminator_loss(real, fake) / 2
        loss.backward()
        d_total += float(loss.detach())
    with torch.no_grad():
        for p in want_disc.parameters():
            p.copy_(adam_by_hand(p, p.grad, phase.lr, phase.betas))
    want_disc.requires_grad_(False)
    g_total = 0.0
    for pair in pairs:
        loss = distill.generator_loss(distill.discriminate(want_disc, pair, pair.student, conditional)) / 2
        loss.backward()
        g_total += float(loss.detach())
    with torch.no_grad():
        want = adam_by_hand(want_student.weight, want_student.weight.grad, phase.lr, phase.betas)

    figures = loop.train_iteration(STAGE, phase, lanes, student, teacher, loop.make_optimizer(student.parameters(), phase),
                                   generator=torch.Generator().manual_seed(11), clips=2, discriminator=disc,
                                   disc_optimizer=loop.make_optimizer(disc.parameters(), phase))
    torch.testing.assert_close(student.weight.detach(), want, rtol=1e-6, atol=1e-9)
    for got, exp in zip(disc.parameters(), want_disc.parameters()):
        torch.testing.assert_close(got.detach(), exp.detach(), rtol=1e-6, atol=1e-9)
    assert float(figures["d"]) == pytest.approx(d_total, rel=1e-6)
    assert float(figures["g"]) == pytest.approx(g_total, rel=1e-6)
    assert all(disc.saw_start) == conditional and any(disc.saw_start) == conditional  # D' never gets x_t
    assert all(p.requires_grad for p in disc.parameters())  # D is trainable again after the student's step


def test_loss_scale_counts_the_bases_of_every_rank():
    """Lane losses are divided by total_bases (all ranks), so an all-reduce SUM gives the mean update."""
    phase = distill.mse_phase(1, 1e-2)
    grads = {}
    for total in (1, 3):
        student = Nudge(0.05)
        seen = []
        optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
        loop.train_iteration(STAGE, phase, [make_lane(Base(0))], student, None, optimizer,
                             generator=torch.Generator().manual_seed(0), clips=2, total_bases=total,
                             sync_gradients=lambda params, here: seen.append((len(params), here)))
        grads[total] = student.weight.grad.clone()
        assert seen == [(1, 1)]  # the hook ran once, before the step, with this rank's base count
    torch.testing.assert_close(grads[3] * 3, grads[1])


# --- placement, micro-batches, checkpointing: the same update ---------------------------------------------

def run_iterations(kind, *, resident="all", checkpointing=False, on_move=None, toy=False, iterations=2):
    torch.manual_seed(0)
    if toy:
        from lightning.toy import demo

        config = demo.DemoConfig(seen_styles=(0, 1), held_out_styles=())
        world, bases, lanes, student = demo.build(config)
        make = demo.discriminator_factory(world, bases, world.config.styles)
        stage = distill.Stage(8, 4, (distill.mse_phase(1, 1e-2), distill.adversarial_phase("conditional", 1, 1e-3)))
    else:
        lanes, student, make, stage = [make_lane(Base(0)), make_lane(Base(1))], Nudge(0.05), Critic, STAGE
    phase = stage.phases[0] if kind == "mse" else stage.phases[1]
    placement = Placement("cpu", "fp32", resident, on_move=on_move)
    teacher = distill.frozen_copy(student)
    disc = make(True) if phase.adversarial else None
    placement.prepare([lane.base for lane in lanes], [student, teacher, disc])
    if checkpointing:
        assert loop.set_gradient_checkpointing(student, True) > 0
    optimizer = loop.make_optimizer(student.parameters(), phase)
    disc_optimizer = loop.make_optimizer(disc.parameters(), phase) if disc is not None else None
    gen = torch.Generator().manual_seed(5)
    moves_before = placement.moves
    for _ in range(iterations):
        loop.train_iteration(stage, phase, lanes, student, teacher, optimizer, generator=gen, clips=2,
                             micro_batch=1, discriminator=disc, disc_optimizer=disc_optimizer, placement=placement,
                             grad_clip=1.0)
    loop.set_gradient_checkpointing(student, False)
    return student, disc, placement.moves - moves_before, lanes


@pytest.mark.parametrize("kind", ["mse", "conditional"])
def test_swapped_bases_accumulate_to_the_same_update_as_resident_ones(kind):
    where = {}

    def on_move(base, device):
        where[id(base)] = not where.get(id(base), True)  # home (out), in, out, ... (the CPU plays the device)

    resident, resident_disc, moves_all, _ = run_iterations(kind)
    swapped, swapped_disc, moves, lanes = run_iterations(kind, resident="one", on_move=on_move)
    assert moves_all == 0
    passes = 1 if kind == "mse" else 2  # the adversarial iteration visits every lane for D, then for G
    assert moves == 2 * passes * len(lanes) * 2  # in and out, per pass, per lane, per iteration
    assert all(not inside for inside in where.values())  # every base went back to the CPU
    for a, b in zip(resident.parameters(), swapped.parameters()):
        assert torch.equal(a, b)
    if resident_disc is not None:
        for a, b in zip(resident_disc.parameters(), swapped_disc.parameters()):
            assert torch.equal(a, b)


def test_a_swapped_base_only_runs_while_it_is_on_the_device():
    state = {}

    def on_move(base, device):
        state[id(base)] = not state.get(id(base), True)  # prepare's first move sends it home (out)

    lanes = [make_lane(Base(0)), make_lane(Base(1))]
    placement = Placement("cpu", "fp32", "one", on_move=on_move)
    placement.prepare([lane.base for lane in lanes], [])
    for lane in lanes:
        lane.base.resident = lambda base: state[id(base)]
    student = Nudge(0.05)
    loop.train_iteration(STAGE, STAGE.phases[0], lanes, student, None,
                         loop.make_optimizer(student.parameters(), STAGE.phases[0]),
                         generator=torch.Generator().manual_seed(0), clips=1, placement=placement)
    assert all(lane.base.calls for lane in lanes)


@pytest.mark.parametrize("kind", ["mse", "conditional"])
def test_gradient_checkpointing_gives_the_same_weights(kind):
    plain, plain_disc, _, _ = run_iterations(kind, toy=True, iterations=1)
    checkpointed, checkpointed_disc, _, _ = run_iterations(kind, toy=True, checkpointing=True, iterations=1)
    changed = [not torch.equal(p, q) for p, q in zip(plain.parameters(), distill.frozen_copy(plain).parameters())]
    assert changed  # sanity: a comparison of two trained students
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)


def test_iteration_refuses_bad_batches_and_missing_discriminators():
    student = Nudge()
    with pytest.raises(InvalidInputError, match="micro_batch"):
        loop.train_iteration(STAGE, STAGE.phases[0], [make_lane(Base())], student, None,
                             torch.optim.SGD(student.parameters(), lr=0.1), generator=torch.Generator(), clips=3,
                             micro_batch=2)
    with pytest.raises(InvalidInputError, match="discriminator"):
        loop.train_iteration(STAGE, STAGE.phases[1], [make_lane(Base())], student, None,
                             torch.optim.SGD(student.parameters(), lr=0.1), generator=torch.Generator(), clips=1)


# --- fake tensors (the memory plan traces one iteration) ----------------------------------------------------

def traced_iteration(lanes, student, make_discriminator, stage, phase, clips=2):
    """One iteration on fake tensors, the memory plan's way: modules built on meta outside the fake mode,
    materialised as fake CPU tensors inside it. Returns the figures (fake tensors)."""
    teacher = distill.frozen_copy(student)
    disc = make_discriminator(phase.kind == distill.CONDITIONAL) if phase.adversarial else None
    modules = [student, teacher, disc] + [lane.base for lane in lanes]
    for module in modules:
        if module is not None:
            module.to("meta")
    with FakeTensorMode(allow_non_fake_inputs=True):
        for module in modules:
            if module is not None:
                module.to_empty(device="cpu")
        optimizer = loop.make_optimizer([p for p in student.parameters() if p.requires_grad], phase)
        disc_optimizer = loop.make_optimizer(disc.parameters(), phase) if disc is not None else None
        figures = loop.train_iteration(stage, phase, lanes, student, teacher, optimizer,
                                       generator=torch.Generator().manual_seed(0), clips=clips, micro_batch=1,
                                       discriminator=disc, disc_optimizer=disc_optimizer, grad_clip=1.0)
    return figures


@pytest.mark.parametrize("kind", ["mse", "conditional"])
def test_one_iteration_traces_under_fake_tensor_mode(kind):
    phase = STAGE.phases[0] if kind == "mse" else STAGE.phases[1]
    figures = traced_iteration([make_lane(Base(0)), make_lane(Base(1))], Nudge(0.05), Critic, STAGE, phase)
    from torch._subclasses.fake_tensor import is_fake

    assert figures and all(is_fake(v) and v.ndim == 0 for v in figures.values())


@pytest.mark.parametrize("kind", ["mse", "conditional"])
def test_one_toy_iteration_traces_under_fake_tensor_mode(kind):
    from lightning.toy import demo

    config = demo.DemoConfig(seen_styles=(0,), held_out_styles=())
    world, bases, lanes, student = demo.build(config)
    make = demo.discriminator_factory(world, bases, world.config.styles)
    stage = distill.Stage(8, 4, (distill.mse_phase(1, 1e-2), distill.adversarial_phase("conditional", 1, 1e-3)))
    traced_iteration(lanes, student, make, stage, stage.phases[0 if kind == "mse" else 1])


# --- stages in memory (what the toy demo runs) ------------------------------------------------------------

def test_run_stage_trains_the_student_against_a_frozen_teacher_with_fresh_discriminators():
    made = []

    def factory(conditional):
        made.append(Critic(conditional))
        return made[-1]

    stage = distill.Stage(4, 2, (distill.mse_phase(3, 1e-2), distill.adversarial_phase("conditional", 2, 1e-2),
                                 distill.adversarial_phase("unconditional", 2, 1e-2)),
                          extra_timesteps=(749, 249))
    student = Nudge(0.0)
    records = []
    result = loop.run_stage(stage, [make_lane(Base(0)), make_lane(Base(1))], student,
                            make_discriminator=factory, clips=2, callback=records.append)
    assert [d.conditional for d in made] == [True, False]  # one fresh D per phase, D then D'
    assert made[0] is not made[1] and result.discriminators["unconditional"] is made[1]
    assert all(made[0].saw_start) and not any(made[1].saw_start)  # D' never gets x_t
    assert [r["phase"] for r in records] == ["mse"] * 3 + ["conditional"] * 2 + ["unconditional"] * 2
    assert all(math.isfinite(r["mse"]) for r in records[:3])
    assert all({"d", "g", "accuracy", "preference"} <= set(r) for r in records[3:])
    assert not torch.equal(student.weight, torch.zeros(2))  # the student moved
    assert torch.equal(result.teacher.weight, torch.zeros(2)) and not result.teacher.weight.requires_grad


def test_a_trainer_lets_go_of_each_phases_discriminator_and_of_spent_gradients():
    """A run folder trainer keeps one discriminator at a time and no gradients between iterations (on SD1.5
    each is GBs: a second D plus its Adam state and stale gradients is what pushed a CPU run out of memory)."""
    import gc
    import weakref

    made = []

    def factory(conditional):
        made.append(weakref.ref(d := Critic(conditional)))
        return d

    stage = distill.Stage(4, 2, (distill.adversarial_phase("conditional", 2, 1e-2),
                                 distill.adversarial_phase("unconditional", 2, 1e-2)), extra_timesteps=(749, 249))
    config = loop.Config()
    config.run.device = "cpu"
    config.stage.clips = config.stage.micro_batch = 2
    config.checkpoint.every = config.validation.every = 0
    student = Nudge(0.0)
    setup = loop.Setup([make_lane(Base(0)), make_lane(Base(1))], student, None, factory, None, None)
    trainer = loop.Trainer(setup, config, stage=stage)
    trainer.prepare()
    seen = []
    while not trainer.finished:
        while trainer.step < trainer.phase.iterations:
            trainer.run_iteration()
            seen.append([p.grad for p in list(student.parameters()) + list(trainer.discriminator.parameters())])
        trainer.end_phase()
        gc.collect()
    assert all(g is None for grads in seen for g in grads)
    assert len(made) == 2 and made[0]() is None  # D of the conditional phase is gone once D' exists
    assert not trainer.discriminators


def test_adversarial_stage_without_a_discriminator_factory_is_refused():
    with pytest.raises(InvalidInputError, match="make_discriminator"):
        loop.run_stage(distill.paper_stages()[1], [make_lane(Base())], Nudge())


def test_stage_chain_must_connect():
    stages = (distill.Stage(32, 8, (distill.mse_phase(1),)), distill.Stage(4, 2, (distill.mse_phase(1),)))
    with pytest.raises(InvalidInputError, match="must start where"):
        loop.run_stages(stages, [make_lane(Base())], Nudge())


def test_student_starts_on_its_grid_with_pure_noise_at_the_top():
    base = Base()
    stage = distill.Stage(4, 2, (distill.mse_phase(4, 1e-3),), extra_timesteps=(749, 249))
    loop.run_stage(stage, [make_lane(base)], Nudge(), clips=8)
    seen = {int(t) for call in base.calls for t in call.tolist()}
    # teacher sub-steps and student starts are all on the 4-step grid (the end shows as timestep 0)
    assert seen <= {999, 749, 499, 249, 0}
    assert {999, 749, 499, 249} <= seen


def test_light_discriminator_trains_only_head_embeddings_and_motion():
    from lightning.toy import demo

    world, bases, _, _ = demo.build(demo.DemoConfig(seen_styles=(0,), held_out_styles=()))
    disc = demo.discriminator_factory(world, bases, world.config.styles)(True)
    loop.set_discriminator_trainable(disc, "light")
    trainable = {n for n, p in disc.named_parameters() if p.requires_grad}
    frozen = {n for n, p in disc.named_parameters() if not p.requires_grad}
    assert any(n.startswith("head.") for n in trainable) and "base_embedding.weight" in trainable
    assert any("motion" in n for n in trainable) and frozen  # e.g. the copied templates and lift
    assert all(not n.startswith("head.") for n in frozen)
    loop.set_discriminator_trainable(disc, "full")
    assert all(p.requires_grad for p in disc.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths_keep_float32_master_weights(precision):
    """The GPU's autocast + GradScaler path, run on the CPU's autocast (a CUDA run takes the same code)."""
    from lightning.toy import demo

    world, bases, lanes, student = demo.build(demo.DemoConfig(seen_styles=(0,), held_out_styles=()))
    stage = distill.Stage(8, 4, (distill.mse_phase(1, 1e-2), distill.adversarial_phase("conditional", 1, 1e-3)))
    placement = Placement("cpu")
    assert placement.precision == "fp32"  # a CPU run is the float32 reference ...
    placement.precision = precision  # ... so the autocast path is forced here
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4) if precision == "fp16" else None
    before = copy.deepcopy(student)
    disc = demo.discriminator_factory(world, bases, world.config.styles)(True)
    for phase in stage.phases:
        figures = loop.train_iteration(
            stage, phase, lanes, student, distill.frozen_copy(before), loop.make_optimizer(student.parameters(), phase),
            generator=torch.Generator().manual_seed(0), clips=2, placement=placement, scaler=scaler, grad_clip=1.0,
            discriminator=disc if phase.adversarial else None,
            disc_optimizer=loop.make_optimizer(disc.parameters(), phase) if phase.adversarial else None)
        if scaler is not None:
            scaler.update()
        assert all(torch.isfinite(v) for v in figures.values()), figures
    assert all(p.dtype == torch.float32 for p in list(student.parameters()) + list(disc.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), before.parameters()))
