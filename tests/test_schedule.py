import math

import pytest
import torch

from lightning import schedule

diffusers = pytest.importorskip("diffusers")

# lightning/REFERENCE.md §2: EulerDiscreteScheduler, trailing, linear betas, computed with diffusers.
REFERENCE_TRAILING = {
    1: [25.146116],
    2: [25.146116, 2.275962],
    3: [25.146116, 4.495611, 1.209594],
    4: [25.146116, 6.557212, 2.275962, 0.867020],
    8: [25.146116, 12.322533, 6.557212, 3.755283, 2.275962, 1.419212, 0.867020, 0.461271],
}
REFERENCE_TRAILING_TIMESTEPS = {
    1: [999], 2: [999, 499], 3: [999, 666, 332], 4: [999, 749, 499, 249],
    8: [999, 874, 749, 624, 499, 374, 249, 124],
}
# REFERENCE.md §2: the 32-step table is given to three decimals, head and tail only.
REFERENCE_32_HEAD = [25.146, 20.902, 17.467, 14.591, 12.323]
REFERENCE_32_TAIL = [0.371, 0.277, 0.179]
REFERENCE_32_TIMESTEPS_HEAD = [999, 968, 937, 905, 874]
REFERENCE_32_TIMESTEPS_TAIL = [93, 61, 30]
# REFERENCE.md §2: ComfyUI sgm_uniform on sqrt_linear betas.
REFERENCE_SGM_4 = [25.146115, 6.564986, 2.280343, 0.869781]
REFERENCE_SGM_8 = [25.146, 12.331, 6.565, 3.761, 2.280, 1.423, 0.870, 0.464]
REFERENCE_SGM_2 = [25.146, 2.280]


def _euler(spacing="trailing", **kw):
    return diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
        timestep_spacing=spacing, prediction_type="epsilon", **kw)


def _rel(a, b):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs() / b.abs().clamp_min(1e-12)).max().item()


@pytest.mark.parametrize("steps", sorted(REFERENCE_TRAILING))
def test_trailing_sigmas_match_the_reference_table(steps):
    got = schedule.sigmas(steps)
    assert _rel(got[:-1], REFERENCE_TRAILING[steps]) < 1e-5
    assert got[-1].item() == 0.0
    assert schedule.timesteps(steps).tolist() == REFERENCE_TRAILING_TIMESTEPS[steps]


def test_32_step_table_matches_the_reference():
    got = schedule.sigmas(32)
    assert got.shape == (33,)
    assert _rel(got[:5], REFERENCE_32_HEAD) < 5e-4 / 0.179
    assert torch.allclose(got[-4:-1].double(), torch.tensor(REFERENCE_32_TAIL, dtype=torch.float64), atol=6e-4)
    ts = schedule.timesteps(32)
    assert ts[:5].tolist() == REFERENCE_32_TIMESTEPS_HEAD
    assert ts[-3:].tolist() == REFERENCE_32_TIMESTEPS_TAIL


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 25, 32, 50, 128])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_sigmas_match_diffusers_euler(steps, spacing):
    kw = {"steps_offset": schedule.LEADING_STEPS_OFFSET} if spacing == "leading" else {}
    sched = _euler(spacing, **kw)
    sched.set_timesteps(steps)
    ours = schedule.sigmas(steps, spacing)
    assert ours.dtype == torch.float32
    # diffusers keeps abar in float32, which limits it to ~1e-6 absolute near t = 0; ours is float64
    err = (ours[:-1].double() - sched.sigmas[:-1].double()).abs()
    assert bool((err <= 1e-5 * sched.sigmas[:-1].double() + 1e-6).all()), err.max()
    assert ours[-1] == 0 and sched.sigmas[-1] == 0
    assert torch.allclose(schedule.timesteps(steps, spacing), sched.timesteps.double())


def test_alphas_cumprod_match_diffusers():
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="linear")
    assert _rel(schedule.alphas_cumprod(), ddpm.alphas_cumprod) < 1e-5
    assert _rel(schedule.betas(), ddpm.betas) < 1e-6
    # REFERENCE.md §2 spot values of sqrt(abar_t)
    for t, v in {874: 0.080886, 749: 0.150761, 624: 0.257324, 499: 0.402259, 374: 0.575992,
                 249: 0.755557, 124: 0.908052, 999: 0.039736}.items():
        assert abs(schedule.alphas_cumprod()[t].sqrt().item() - v) < 2e-6
    assert abs(schedule.sigma_max() - 25.146116) < 1e-5
    assert abs(schedule.sigma_min() - 0.029167) < 1e-6


def test_sgm_uniform_matches_the_comfyui_values_in_the_reference():
    assert _rel(schedule.sigmas(4, "sgm_uniform")[:-1], REFERENCE_SGM_4) < 1e-5
    assert torch.allclose(schedule.sigmas(8, "sgm_uniform")[:-1].double(),
                          torch.tensor(REFERENCE_SGM_8, dtype=torch.float64), atol=6e-4)
    assert torch.allclose(schedule.sigmas(2, "sgm_uniform")[:-1].double(),
                          torch.tensor(REFERENCE_SGM_2, dtype=torch.float64), atol=6e-4)
    assert schedule.timesteps(4, "sgm_uniform").tolist() == [999, 749.25, 499.5, 249.75]


def test_simple_picks_integer_timesteps_near_trailing():
    assert schedule.timesteps(4, "simple").tolist() == [999, 749, 499, 249]
    # "simple" and "trailing" coincide wherever 1000/steps is an integer
    for steps in (1, 2, 4, 5, 8, 10, 20, 25):
        assert torch.allclose(schedule.sigmas(steps, "simple"), schedule.sigmas(steps, "trailing"))


@pytest.mark.parametrize("spacing", schedule.SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 8, 32, 1000])
def test_sigmas_shape_order_and_end(spacing, steps):
    if spacing == "leading" and steps == 1000:
        pytest.skip("leading + steps_offset 1 puts t=1000 outside the trained range at 1000 steps (as diffusers)")
    s = schedule.sigmas(steps, spacing)
    assert s.shape == (steps + 1,) and s.dtype == torch.float32
    assert s[-1].item() == 0.0
    assert bool((s[1:] < s[:-1]).all()), "sigmas must strictly decrease"
    assert s[0].item() <= schedule.sigma_max() + 1e-4


def test_sigma_timestep_round_trip():
    ts = torch.arange(0, 1000, dtype=torch.float64)
    back = schedule.sigma_to_timestep(schedule.timestep_to_sigma(ts))
    assert (back - ts).abs().max().item() < 1e-6
    frac = torch.tensor([0.25, 10.5, 749.25, 998.75], dtype=torch.float64)
    back = schedule.sigma_to_timestep(schedule.timestep_to_sigma(frac, "log"))
    assert (back - frac).abs().max().item() < 1e-6
    # outside the trained range clamps
    assert schedule.sigma_to_timestep(100.0).item() == 999
    assert schedule.sigma_to_timestep(1e-4).item() == 0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="spacing"):
        schedule.sigmas(4, "karras")
    for bad in (0, -1, 1001, 2.5, True):
        with pytest.raises(ValueError, match="steps must be"):
            schedule.sigmas(bad)
    with pytest.raises(ValueError, match="interpolation"):
        schedule.timestep_to_sigma(3.0, "cubic")


def test_public_tables_are_copies():
    s = schedule.train_sigmas()
    s.zero_()
    assert schedule.train_sigmas()[-1].item() > 25
    assert math.isclose(schedule.scale_model_input(torch.tensor(2.0), 0.0).item(), 2.0)
