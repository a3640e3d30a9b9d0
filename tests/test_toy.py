"""The toy world: exact teacher, its premises, the measures, and distillation proven end to end on CPU.

The end-to-end distillation tests share trained runs through module-scoped fixtures (see ``trained``).
"""

import copy
import json
import math
import types

import numpy as np
import pytest
import torch

from lightning import distill, sampling, schedule
from lightning.toy import demo, measures
from lightning.toy.models import ToyBase, make_motion_module
from lightning.toy.world import ToyWorld, WorldConfig
from training import loop

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def world():
    return ToyWorld(demo.DemoConfig().world)


@pytest.fixture(autouse=True)
def one_thread():
    """The toy's ops are tiny: one thread is as fast and does not fight other processes for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sample_videos(denoiser, steps, clips, seed, cfg):
    noise = sampling.make_noise((clips * cfg.frames, *cfg.latent_shape), seed)
    with torch.no_grad():
        return sampling.sample(denoiser, noise, schedule.sigmas(steps), noise_scaling="comfyui")


# --- the exact teacher ----------------------------------------------------------------------------------

def test_exact_denoiser_is_the_score_of_the_noisy_mixture():
    """Tweedie: eps(x_in) = -b * grad log p(x_in) with p the mixture pushed through x_in = a x0 + b eps."""
    small = ToyWorld(WorldConfig(frames=3, size=4, motions=5, styles=2))
    mixture = small.mixture(1)
    denoiser = small.exact_denoiser(1)
    for t in (999.0, 600.0, 120.0, 5.0):
        sigma = float(schedule.timestep_to_sigma(torch.tensor(t), "log"))
        a = 1 / math.sqrt(sigma ** 2 + 1)
        b = sigma * a
        std = math.sqrt(a * a * mixture.spread ** 2 + b * b)
        x_in = (a * mixture.sample(4, torch.Generator().manual_seed(int(t))) + b * torch.randn(4, mixture.dim, dtype=torch.float64))
        x_in.requires_grad_(True)
        per_component = torch.distributions.Normal(a * mixture.means[:, None, :], std).log_prob(x_in[None]).sum(-1)
        log_p = torch.logsumexp(per_component, dim=0) - math.log(mixture.components)
        (score,) = torch.autograd.grad(log_p.sum(), x_in)
        rows = x_in.detach().reshape(4 * 3, 4, 4, 4)
        eps = denoiser(rows, torch.full((12,), t, dtype=torch.float64)).reshape(4, -1)
        torch.testing.assert_close(eps, -b * score, rtol=1e-9, atol=1e-9)


def test_premise_teacher_at_32_is_the_data_and_few_steps_blur(world):
    cfg = world.config
    reference = measures.Reference.build(world.mixture(0))
    floor = measures.sliced_wasserstein(world.mixture(0).sample(512, torch.Generator().manual_seed(3)), reference)
    got = {steps: measures.measure(sample_videos(world.exact_denoiser(0), steps, 512, 1, cfg), reference)
           for steps in (32, 4, 2)}
    assert got[32]["nearest_mode_error"] < 0.05 and got[32]["coverage"] == 1.0
    assert got[32]["distance"] < 3 * floor  # as close to the data as a fresh true sample set, within noise
    assert got[4]["nearest_mode_error"] > 0.15  # blends of neighbouring motions
    assert got[4]["distance"] > 2 * got[32]["distance"]
    assert got[2]["nearest_mode_error"] > 0.4 and got[2]["distance"] > 2 * got[4]["distance"]


def test_student_at_initialisation_is_exactly_the_teacher(world):
    base = ToyBase(world, 2)
    student = make_motion_module()
    x = torch.randn(3 * world.config.frames, *world.config.latent_shape)
    for t in (999.0, 499.0, 30.0):
        timestep = torch.full((x.shape[0],), t, dtype=torch.float64)
        with torch.no_grad():
            plain = base(x, timestep, None, None)
            with_module = base(x, timestep, None, student)
        assert torch.equal(plain, with_module)  # zero-initialised proj_out: bit for bit
        torch.testing.assert_close(plain, world.exact_denoiser(2)(x, timestep), rtol=1e-6, atol=1e-6)


def test_styles_render_the_same_motions_differently(world):
    m0, m1 = world.mixture(0), world.mixture(1)
    assert not torch.allclose(m0.means, m1.means)
    # same motion in two styles: the blob sits at the same place (2-D centre of mass of its energy, in the
    # second half of the clip where it is well inside the frame), and there it follows the trajectory
    def centres(mixture):
        energy = mixture.frame_means().reshape(8, 8, 4, 8, 8).square().sum(2)[:, 4:]
        rows = torch.arange(8, dtype=torch.float64)
        total = energy.sum((-1, -2))
        return torch.stack([(energy.sum(-1) * rows).sum(-1) / total, (energy.sum(-2) * rows).sum(-1) / total], -1)

    torch.testing.assert_close(centres(m0), centres(m1), atol=0.3, rtol=0)
    torch.testing.assert_close(centres(m0), world.trajectories()[:, 4:], atol=0.3, rtol=0)


def test_motion_module_sees_only_the_pooled_view(world):
    """The student's view is lossy: detail inside a pooling block changes the exact posterior, not what the
    motion module adds to it."""
    torch.manual_seed(0)
    student = make_motion_module()
    torch.nn.init.normal_(student.mid.temporal_transformer.proj_out.weight, std=0.3)
    cfg = world.config
    x = torch.randn(2 * cfg.frames, *cfg.latent_shape, dtype=torch.float64)
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64).repeat(cfg.size // 2, cfg.size // 2)
    detail = 0.5 * checker * torch.randn(2 * cfg.frames, cfg.channels, 1, 1, dtype=torch.float64)
    sigma = torch.tensor([0.5, 0.5], dtype=torch.float64)
    lossy, exact = ToyBase(world, 0, view_grid=4), ToyBase(world, 0)

    def change(base, video):
        with torch.no_grad():
            return base._logit_change(student, video.reshape(2, cfg.frames, -1), sigma)

    assert change(lossy, x).abs().max() > 1e-3
    torch.testing.assert_close(change(lossy, x + detail), change(lossy, x))
    assert not torch.allclose(change(exact, x + detail), change(exact, x))


def test_template_fit_tells_motions_from_blends(world):
    from lightning.toy.critic import template_fit

    mixture = world.mixture(0)
    templates = mixture.frame_means()
    jitter = mixture.spread * torch.randn(8, mixture.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    motions = mixture.means + jitter
    blends = 0.5 * (mixture.means + mixture.means.roll(1, 0)) + jitter  # each motion with a neighbour
    sigma = torch.full((8,), 0.03, dtype=torch.float64)
    on_motion, on_blend = (template_fit(v, sigma, templates).min(dim=1).values for v in (motions, blends))
    assert on_motion.max() < on_blend.min() - 1.0  # more than e times closer to its own template


# --- measures -------------------------------------------------------------------------------------------

def test_measures_on_modes_blends_and_true_samples(world):
    mixture = world.mixture(0)
    reference = measures.Reference.build(mixture)
    errors, nearest = measures.nearest_mode_errors(mixture.means, reference)
    assert torch.allclose(errors, torch.zeros(8, dtype=torch.float64), atol=1e-9)
    assert nearest.tolist() == list(range(8))
    d = torch.cdist(mixture.means, mixture.means)
    d.fill_diagonal_(float("inf"))
    i, j = divmod(int(d.argmin()), 8)
    blend = 0.5 * (mixture.means[i] + mixture.means[j])
    assert measures.nearest_mode_errors(blend[None], reference)[0].item() == pytest.approx(0.5)
    assert measures.coverage(blend[None], reference) == 0.0
    true = mixture.sample(1024, torch.Generator().manual_seed(5))
    got = measures.measure(true, reference)
    assert got["coverage"] == 1.0 and got["nearest_mode_error"] < 0.05
    blends = 0.5 * (true + true.roll(1, 0))
    assert measures.measure(blends, reference)["distance"] > 5 * got["distance"]
    shuffled = true[torch.randperm(1024, generator=torch.Generator().manual_seed(1))]
    assert measures.sliced_wasserstein(shuffled, reference) == pytest.approx(got["distance"], rel=1e-12)
    assert measures.sliced_wasserstein(reference.samples, reference) == pytest.approx(0.0, abs=1e-12)


# --- distillation, end to end (the demo's claims) ------------------------------------------------------
# CI-sized version of the demo: the same stage plan (32->8 MSE, then 8->4, 4->2 and 2->1 with D then D'),
# fewer iterations and clips, learning rates scaled 2000x instead of the demo's 1000x (ratio and betas kept).

CI = {"mse_iterations": 60, "mse_clips": 8, "adversarial_iterations": ((40, 40), (40, 40), (40, 40)),
      "adversarial_clips": 8, "lr_scale": 2000.0, "eval_samples": 512}
SEEDS = (0, 1, 2)


def run_pipeline(styles=None, models=demo.MODELS, samples=None, mse_only=True, **overrides):
    """Train with ``CI`` + ``overrides`` (and the mse-only ablation unless told not to); evaluate ``models``."""
    # module-scoped fixtures start before the autouse one_thread: a second spinning thread on a busy
    # machine makes these tiny ops several times slower
    with loop.pinned_threads(1):
        return _run_pipeline(styles, models, samples, mse_only, overrides)


def _run_pipeline(styles, models, samples, mse_only, overrides):
    config = demo.DemoConfig(**{**CI, **overrides})
    world, bases, lanes, student = demo.build(config)
    base_state = {i: copy.deepcopy(b.state_dict()) for i, b in bases.items()}
    student_state = copy.deepcopy(student.state_dict())
    if mse_only:
        _, history, students = demo.train_both(config, world, bases, lanes, student)
    else:
        _, history = demo.train(config, world, bases, lanes, student)
        students = {demo.STUDENT: student}
    per_style = demo.evaluate(world, bases, students, styles or config.seen_styles, models=models,
                              samples=samples or config.eval_samples, seed=config.seed)
    return types.SimpleNamespace(config=config, world=world, bases=bases, student=student, students=students,
                                 history=history, per_style=per_style, base_state=base_state,
                                 student_state=student_state, discriminator=demo.discriminator_learning(history),
                                 metrics=demo.metrics_json(per_style, config.seen_styles, {}))


@pytest.fixture(scope="module")
def trained():
    """One motion module distilled on styles 0, 1, 2 (style 3 held out)."""
    return run_pipeline(styles=(0, 1, 2, 3), mse_only=False,
                        models=("teacher@32", "teacher@4", "teacher@2", "student@4", "student@2"))


@pytest.fixture(scope="module")
def single_style_runs():
    """Per seed: the student and its mse-only ablation distilled on style 0 alone (the cheapest full plan)."""
    return {seed: run_pipeline(seed=seed, seen_styles=(0,), held_out_styles=(1, 2, 3),
                               styles=(0, 1, 2, 3) if seed == 0 else (0,),  # seed 0 is also the cross-model baseline
                               models=("student@4", "student@2", "student@1", "mse-only@2", "mse-only@1"))
            for seed in SEEDS}


def test_distillation_works(trained):
    m = trained.metrics
    student, teacher = m["student@4"]["distance"], m["teacher@4"]["distance"]
    assert student <= 0.5 * teacher, (student, teacher)
    assert student <= 1.5 * m["teacher@32"]["distance"], (student, m["teacher@32"])
    assert m["student@2"]["distance"] <= 0.5 * m["teacher@2"]["distance"], (m["student@2"], m["teacher@2"])
    for steps in (4, 2):
        assert m[f"student@{steps}"]["nearest_mode_error"] < 0.5 * m[f"teacher@{steps}"]["nearest_mode_error"]
    held_out = trained.per_style[3]  # never trained on
    for steps in (4, 2):
        assert held_out[f"student@{steps}"]["nearest_mode_error"] < 0.5 * held_out[f"teacher@{steps}"]["nearest_mode_error"]


def test_only_the_motion_module_changes(trained):
    for index, base in trained.bases.items():
        after = base.state_dict()
        assert after.keys() == trained.base_state[index].keys()
        assert all(torch.equal(after[k], trained.base_state[index][k]) for k in after), f"base {index} changed"
    changed = {k for k, v in trained.student.state_dict().items() if not torch.equal(v, trained.student_state[k])}
    assert changed and all(k.startswith("mid_block.") for k in changed)  # the only module on a feature map
    assert "mid_block.motion_modules.0.temporal_transformer.proj_out.weight" in changed


def test_cross_model_distillation_beats_single_model_on_the_other_styles(trained, single_style_runs):
    """Styles 1 and 2: seen by the multi-style student only. Style 3: unseen by both (paper §5.2)."""
    multi = demo.evaluate(trained.world, trained.bases, trained.students, (1, 2, 3),
                          models=("student@4", "student@2"), samples=512, seed=0)
    single = single_style_runs[0].per_style  # same seed, same noise, style 0 alone
    for style in (1, 2):
        for steps in (4, 2):
            m, s = multi[style][f"student@{steps}"], single[style][f"student@{steps}"]
            assert m["nearest_mode_error"] < s["nearest_mode_error"], (style, steps, m, s)
        m, s = multi[style]["student@2"], single[style]["student@2"]
        assert m["distance"] < s["distance"], (style, m, s)
    m, s = multi[3]["student@2"], single[3]["student@2"]
    assert m["nearest_mode_error"] < s["nearest_mode_error"], (m, s)


@pytest.mark.parametrize("steps", (2, 1))
def test_adversarial_beats_mse_only_across_seeds(single_style_runs, steps):
    """The paper's claim in the toy world: with a student that sees its input through a lossy view, MSE
    distillation regresses to blends of the motions it cannot tell apart; D and D' make it commit to one.
    Same 8-step student, same budget, every seed."""
    for seed, run in single_style_runs.items():
        adversarial, mse = run.per_style[0][f"student@{steps}"], run.per_style[0][f"mse-only@{steps}"]
        assert adversarial["nearest_mode_error"] < 0.8 * mse["nearest_mode_error"], (seed, adversarial, mse)


def test_each_conditional_discriminator_learns(single_style_runs):
    """Over every conditional phase, on pairs it had not trained on yet, D ranks the teacher's jump above the
    student's (same x_t) more often than chance - on each seed, and clearly so pooled over the seeds."""
    stages = {"8->4", "4->2", "2->1"}
    for seed, run in single_style_runs.items():
        assert set(run.discriminator) == stages
        for stage, d in run.discriminator.items():
            assert d["preference"] > 0.5 and d["accuracy"] > 0.5, (seed, stage, d)
    for stage in stages:
        pooled = np.mean([run.discriminator[stage]["preference"] for run in single_style_runs.values()])
        # 40 iterations x 8 pairs per seed: chance would give 0.5 with a standard error of about 0.016
        assert pooled > 0.53, (stage, pooled)


def test_demo_writes_its_outputs(tmp_path):
    import cv2
    from safetensors import safe_open

    config = demo.DemoConfig(mse_iterations=3, adversarial_iterations=((2, 2), (2, 2), (2, 2)), mse_clips=2,
                             adversarial_clips=2, eval_samples=32, video_samples=1)
    lines = []
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = demo.run_demo(tmp_path / "out", config, echo=lines.append)
    finally:
        torch.set_num_threads(before)
    out = tmp_path / "out"
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) == set(demo.MODELS) | {"per_style", "discriminator", "run"}
    assert {"mse-only@2", "mse-only@1", "student@2", "student@1"} <= set(demo.MODELS)  # the ablation beside the student
    assert set(saved["discriminator"]) == {"8->4", "4->2", "2->1"}
    assert all(0 <= d["preference"] <= 1 and d["d"] > 0 for d in saved["discriminator"].values())
    assert [st["name"] for st in saved["run"]["mse_only_stages"]] == ["32->8", "8->4", "4->2", "2->1"]
    for name in demo.MODELS:
        assert set(saved[name]) == {"distance", "nearest_mode_error", "coverage"}
        mean = np.mean([saved["per_style"][str(s)][name]["distance"] for s in (0, 1, 2)])
        assert saved[name]["distance"] == pytest.approx(mean)  # averaged over the seen styles only
    assert set(saved["per_style"]) == {"0", "1", "2", "3"}
    assert saved == json.loads(json.dumps(metrics))
    video = cv2.VideoCapture(str(out / "samples.mp4"))
    frames = 0
    while video.read()[0]:
        frames += 1
    assert frames == 3 * config.world.frames  # the clip, looped three times
    for name in ("samples.png", "losses.png"):
        assert cv2.imread(str(out / name)) is not None
    # original AnimateDiff key layout (with both positional tables per module), step count in the metadata
    assert {p.name for p in out.glob("student_*step.safetensors")} == {f"student_{n}step.safetensors"
                                                                       for n in (8, 4, 2, 1)}
    with safe_open(str(out / "student_2step.safetensors"), "pt") as f:
        assert f.metadata()["adlightning.lightning_steps"] == "2"
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight" in tensors
    weights = {k: v for k, v in tensors.items() if ".pos_encoder." not in k}
    reloaded = make_motion_module()
    reloaded.load_state_dict(weights)  # strict: every weight of the set is there
    x = torch.randn(8, *config.world.latent_shape)
    assert torch.isfinite(ToyBase(ToyWorld(), 0)(x, torch.full((8,), 499.0, dtype=torch.float64), None, reloaded)).all()
    assert any("teacher@32" in line for line in lines) and any("run time" in line for line in lines)
    assert not list(out.glob(".*partial*"))  # nothing half-written left behind


def test_mse_only_ablation_swaps_the_discriminators_for_mse_at_the_same_budget():
    paper, ablation = demo.DemoConfig(), demo.DemoConfig().mse_only()
    assert [st.name for st in paper.stages()] == ["32->8", "8->4", "4->2", "2->1"]
    assert paper.stages()[-1].extra_timesteps == distill.EXTRA_TIMESTEPS[1]
    assert paper.stages()[0] == ablation.stages()[0]  # the 32->8 MSE stage is shared
    for adv, mse in zip(paper.stages()[1:], ablation.stages()[1:], strict=True):
        assert adv.has_adversarial and not mse.has_adversarial
        assert (adv.teacher_steps, adv.student_steps, adv.extra_timesteps) == \
            (mse.teacher_steps, mse.student_steps, mse.extra_timesteps)
        assert sum(p.iterations for p in adv.phases) == sum(p.iterations for p in mse.phases)
        assert {p.clips for p in adv.phases} == {p.clips for p in mse.phases}
        assert all(p.lr == distill.PAPER_MSE_LR * paper.lr_scale for p in mse.phases)
