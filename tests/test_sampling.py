import logging
import math

import pytest
import torch

from lightning import sampling, schedule

diffusers = pytest.importorskip("diffusers")


def fixed_denoiser(x_in, t, cond=None):
    """A deterministic, nonlinear stand-in UNet. Its linear part shrinks the sample towards unit scale the way a
    real denoiser does (so values stay O(1) and float32 rounding inside diffusers stays far below 1e-5)."""
    tt = t.reshape(-1, *([1] * (x_in.ndim - 1))).to(x_in.dtype)
    out = x_in * (0.3 + 0.7 * tt / 999.0) + 0.2 * torch.sin(3.0 * x_in + tt / 170.0)
    if cond is not None:
        out = out + 0.1 * cond
    return out


def _euler_scheduler():
    return diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
        timestep_spacing="trailing", prediction_type="epsilon")


def _diffusers_run(noise, steps, start=0, latent=None, states=None):
    """diffusers' Euler loop. With ``states`` (our x before each step), every step starts from our state
    (teacher forcing), so each step is compared on its own; without, it is an independent full run."""
    sched = _euler_scheduler()
    sched.set_timesteps(steps)
    ts = sched.timesteps[start:]
    if latent is None:
        x = noise * sched.init_noise_sigma
    else:
        sched.set_begin_index(start)
        x = sched.add_noise(latent, noise, ts[:1])
    traj = [x]
    for i, t in enumerate(ts):
        if states is not None:
            x = states[i]
        x_in = sched.scale_model_input(x, t)
        eps = fixed_denoiser(x_in, torch.full((x.shape[0],), float(t), dtype=torch.float64))
        x = sched.step(eps, t, x).prev_sample
        traj.append(x)
    return traj


def _our_trajectory(noise, sigmas, **kw):
    traj = []
    out = sampling.sample(fixed_denoiser, noise, sigmas, callback=lambda d: traj.append(d["x"]), **kw)
    traj.append(out)
    return traj


@pytest.mark.parametrize("steps", [4, 8])
def test_full_run_matches_diffusers_euler_step_by_step(steps):
    g = torch.Generator().manual_seed(steps)
    noise = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    sched = _euler_scheduler()
    sched.set_timesteps(steps)
    # The same sigma table on both sides (ours equals diffusers' to 1e-5 relative, test_schedule checks
    # that); this test isolates the sampler arithmetic.
    ours = _our_trajectory(noise, sched.sigmas)
    assert len(ours) == steps + 1 and all(x.dtype == torch.float64 for x in ours)
    # diffusers' step() rounds the sample to float32 internally, so per step it starts from our float64 state
    forced = _diffusers_run(noise, steps, states=ours)
    for i, (a, b) in enumerate(zip(ours, forced)):
        assert (a - b).abs().max().item() < 1e-5, f"step {i}"
    # two independent full runs
    free = _diffusers_run(noise, steps)
    for i, (a, b) in enumerate(zip(ours, free)):
        assert (a - b).abs().max().item() < 1e-5, f"free run, step {i}"
    # with our own float64-derived table the run agrees to diffusers' float32 table rounding
    own = _our_trajectory(noise, schedule.sigmas(steps))
    for a, b in zip(own, free):
        assert (a - b).abs().max().item() < 2e-5


def test_img2vid_tail_matches_diffusers_add_noise_then_euler():
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    latent = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    sched = _euler_scheduler()
    sched.set_timesteps(4)
    assert torch.equal(sampling.strength_sigmas(4, 0.5), schedule.sigmas(4)[2:])
    ours = _our_trajectory(noise, sched.sigmas[2:], latent=latent)
    theirs = _diffusers_run(noise, 4, start=2, latent=latent, states=ours)
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() < 1e-5


def test_move_is_ddim_eta0_in_vp_variables():
    ddim = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="linear", timestep_spacing="trailing", clip_sample=False,
                                   set_alpha_to_one=False, prediction_type="epsilon")
    ddim.set_timesteps(4)
    abar = schedule.alphas_cumprod()
    g = torch.Generator().manual_seed(1)
    x_vp = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    for t in ddim.timesteps[:-1].tolist():  # the last DDIM step lands on t=0, not sigma 0
        t_prev = t - 250
        vp_next = ddim.step(eps, t, x_vp, eta=0.0).prev_sample
        sig, sig_next = schedule.timestep_to_sigma(t).item(), schedule.timestep_to_sigma(t_prev).item()
        x_ve = x_vp / abar[t].sqrt()
        ve_next = sampling.move(x_ve, eps, sig, sig_next)
        assert (ve_next * abar[t_prev].sqrt() - vp_next).abs().max().item() < 1e-5


def test_move_accepts_per_batch_sigmas():
    x = torch.randn(3, 2, 4, 4)
    eps = torch.randn(3, 2, 4, 4)
    s = torch.tensor([5.0, 2.0, 1.0])
    s_next = torch.tensor([2.0, 1.0, 0.0])
    out = sampling.move(x, eps, s, s_next)
    for b in range(3):
        assert torch.allclose(out[b], sampling.move(x[b], eps[b], float(s[b]), float(s_next[b])))
    assert torch.equal(sampling.predicted_x0(x, eps, 2.0), x - 2.0 * eps)


class CountingDenoiser:
    def __init__(self):
        self.calls = 0
        self.rows = 0

    def __call__(self, x_in, t, cond):
        self.calls += 1
        self.rows += x_in.shape[0]
        assert t.shape == (x_in.shape[0],)
        return fixed_denoiser(x_in, t, cond)


def test_cfg1_calls_denoiser_once_per_step_and_ignores_uncond():
    den = CountingDenoiser()
    noise = torch.randn(16, 4, 8, 8)
    cond = torch.randn(16, 4, 8, 8)
    out_a = sampling.sample(den, noise, schedule.sigmas(4), cfg=1.0, cond=cond, uncond=torch.zeros_like(cond))
    assert den.calls == 4 and den.rows == 4 * 16
    out_b = sampling.sample(fixed_denoiser, noise, schedule.sigmas(4), cfg=1.0, cond=cond, uncond=None)
    assert torch.equal(out_a, out_b)


def test_cfg_guides_with_one_doubled_call_when_conds_are_tensors():
    den = CountingDenoiser()
    noise = torch.randn(16, 4, 8, 8, dtype=torch.float64)
    cond = torch.randn(16, 4, 8, 8, dtype=torch.float64)
    uncond = torch.zeros_like(cond)
    got = sampling.sample(den, noise, schedule.sigmas(4), cfg=7.5, cond=cond, uncond=uncond)
    assert den.calls == 4 and den.rows == 4 * 32

    # reference: the CFG formula written out, with separate calls and our own Euler loop
    sig = schedule.sigmas(4).double()
    x = noise * sig[0].item()
    for i in range(4):
        s, s1 = sig[i].item(), sig[i + 1].item()
        t = torch.full((16,), schedule.sigma_to_timestep(s).item(), dtype=torch.float64)
        x_in = x / math.sqrt(s * s + 1)
        e_c, e_u = fixed_denoiser(x_in, t, cond), fixed_denoiser(x_in, t, uncond)
        x = x + (s1 - s) * (e_u + 7.5 * (e_c - e_u))
    assert (got - x).abs().max().item() < 1e-10


def test_cfg_with_non_tensor_conds_calls_twice_per_step():
    den = CountingDenoiser()
    seen = []

    def den_obj(x_in, t, cond):
        seen.append(cond["label"])
        return den(x_in, t, None)

    sampling.sample(den_obj, torch.randn(8, 4, 8, 8), schedule.sigmas(2), cfg=2.0, cond={"label": "c"},
                    uncond={"label": "u"})
    assert den.calls == 4 and seen == ["c", "u", "c", "u"]


def test_cfg_without_uncond_is_a_clear_error():
    with pytest.raises(ValueError, match="uncond"):
        sampling.sample(fixed_denoiser, torch.randn(2, 4, 8, 8), schedule.sigmas(4), cfg=7.5, cond=None)


@pytest.mark.parametrize("strength,t0,n", [(0.25, 249, 1), (0.5, 499, 2), (0.75, 749, 3), (1.0, 999, 4)])
def test_strength_starts_on_the_trained_grid(strength, t0, n):
    sig = sampling.strength_sigmas(4, strength)
    assert len(sig) == n + 1
    assert round(schedule.sigma_to_timestep(sig[0]).item()) == t0
    assert sampling.start_index(4, strength) == 4 - n
    assert torch.equal(sig, schedule.sigmas(4)[4 - n:])


def test_off_grid_strength_snaps_to_nearest_and_says_so(caplog):
    with caplog.at_level(logging.DEBUG, logger="lightning.sampling"):
        sig = sampling.strength_sigmas(4, 0.6)
    assert sampling.snapped_strength(4, 0.6) == 0.5
    assert torch.equal(sig, schedule.sigmas(4)[2:])
    assert "not on the 4-step grid" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="lightning.sampling"):
        sampling.strength_sigmas(4, 0.5)
    assert caplog.text == ""
    # tiny strengths still run one step; 0.65 rounds up to 0.75
    assert sampling.strength_steps(4, 0.01) == 1
    assert sampling.snapped_strength(4, 0.65) == 0.75
    assert sampling.snapped_strength(8, 0.3) == 0.25
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            sampling.strength_steps(4, bad)


def test_initial_latent_scaling_txt2vid_and_vid2vid():
    noise = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    full = schedule.sigmas(4)
    # diffusers (trailing): init_noise_sigma = sigma_max
    assert torch.allclose(sampling.initial_latent(noise, full), noise * float(full[0]))
    # ComfyUI at the top of the schedule: pure noise at the model input at t=999
    x = sampling.initial_latent(noise, full, noise_scaling="comfyui")
    assert torch.allclose(schedule.scale_model_input(x, float(full[0])), noise, atol=1e-6)
    latent = torch.randn_like(noise)
    tail = sampling.strength_sigmas(4, 0.5)
    for scaling in sampling.NOISE_SCALINGS:  # below the top both scale by sigma
        got = sampling.initial_latent(noise, tail, latent, noise_scaling=scaling)
        assert torch.allclose(got, latent + float(tail[0]) * noise)
    with pytest.raises(ValueError, match="noise_scaling"):
        sampling.initial_latent(noise, full, noise_scaling="karras")


def test_noise_is_reproducible_and_matches_comfyui_prepare_noise():
    a = sampling.make_noise((16, 4, 8, 8), seed=1234)
    b = sampling.make_noise((16, 4, 8, 8), seed=1234)
    assert torch.equal(a, b)
    assert not torch.equal(a, sampling.make_noise((16, 4, 8, 8), seed=1235))
    # ComfyUI's comfy.sample.prepare_noise: torch.manual_seed(seed) then one randn of the full shape on the CPU
    torch.manual_seed(1234)
    assert torch.equal(a, torch.randn(16, 4, 8, 8))
    g = torch.Generator().manual_seed(7)
    assert torch.equal(sampling.make_noise((3,), generator=g), torch.randn(3, generator=torch.Generator().manual_seed(7)))


def test_callback_sees_every_step_with_consistent_fields():
    seen = []
    noise = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    sampling.sample(fixed_denoiser, noise, schedule.sigmas(8), callback=seen.append)
    assert [d["i"] for d in seen] == list(range(8))
    for d in seen:
        assert set(d) == {"i", "x", "sigma", "sigma_next", "eps", "denoised"}
        assert torch.allclose(d["denoised"], d["x"] - d["sigma"] * d["eps"])


def test_bad_sigmas_are_rejected():
    with pytest.raises(ValueError, match="sigmas"):
        sampling.sample(fixed_denoiser, torch.randn(1, 4, 8, 8), torch.tensor([1.0]))
