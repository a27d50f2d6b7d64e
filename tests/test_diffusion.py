"""Diffusion math and differentiable rollouts (longalign/diffusion.py, METHOD.md §5)."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

from longalign import diffusion
from longalign.loading import UserError
from longalign.tiny import SD15_SCHEDULER, tiny_unet

LATENT_SHAPE = (4, 8, 8)
ROLLOUT_NAMES = ("ddim_cfg", "lcm")


def make_scheduler(cls=DDPMScheduler, **overrides):
    return cls.from_config({**SD15_SCHEDULER, **overrides})


@pytest.fixture(scope="module")
def ddpm():
    return make_scheduler()


class Output:
    def __init__(self, sample):
        self.sample = sample


class Oracle(torch.nn.Module):
    """Knows the clean latents x0 and returns the exact eps (or v) for any x_t, so every x0
    prediction is x0; its scalar `gain` (1.0) lets gradients reach a parameter."""

    def __init__(self, x0, alphas_cumprod, prediction_type="epsilon"):
        super().__init__()
        self.x0, self.alphas_cumprod, self.prediction_type = x0, alphas_cumprod, prediction_type
        self.gain = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, sample, timestep, encoder_hidden_states):
        a = self.alphas_cumprod[timestep.long()].reshape(-1, 1, 1, 1)
        x0 = self.x0.repeat(sample.shape[0] // self.x0.shape[0], 1, 1, 1)
        eps = (sample - a.sqrt() * x0) / (1 - a).sqrt()
        out = eps if self.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return Output(out * self.gain)


class CountingUNet(torch.nn.Module):
    """Wraps a UNet and records, for every forward call, (grad enabled, input requires grad, batch)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls, self.recording = unet, [], True

    def forward(self, sample, timestep, encoder_hidden_states):
        if self.recording:
            self.calls.append((torch.is_grad_enabled(), sample.requires_grad, sample.shape[0], int(timestep[0])))
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states)


class ScalarModel(torch.nn.Module):
    """A cheap nonlinear 'UNet' with two parameters: out = tanh(p x + q mean(context) + t/1000)."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor(0.7))
        self.q = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, sample, timestep, encoder_hidden_states):
        shift = encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return Output(torch.tanh(self.p * sample + self.q * shift + timestep.reshape(-1, 1, 1, 1) / 1000))


# ---------------------------------------------------------------- schedule arithmetic


def test_schedule_is_sd15(ddpm):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, 0)
    assert torch.allclose(ddpm.alphas_cumprod.double(), expected, rtol=1e-5)
    assert diffusion.ddim_timesteps(50)[:3] == [999, 979, 959]
    assert diffusion.ddim_timesteps(50)[-1] == 19 and len(diffusion.ddim_timesteps(50)) == 50
    ddim = make_scheduler(DDIMScheduler, timestep_spacing="trailing")
    ddim.set_timesteps(50)
    assert ddim.timesteps.tolist() == diffusion.ddim_timesteps(50)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_matches_diffusers(prediction_type):
    ddim = make_scheduler(DDIMScheduler, timestep_spacing="trailing", prediction_type=prediction_type)
    ddim.set_timesteps(50)
    gen = torch.Generator().manual_seed(0)
    for t in (999, 519, 219, 39, 19):  # 19 -> -1: last step, alpha_prev = alphas_cumprod[0]
        sample = torch.randn(2, *LATENT_SHAPE, generator=gen)
        model_output = torch.randn(2, *LATENT_SHAPE, generator=gen)
        expected = ddim.step(model_output, t, sample, eta=0.0).prev_sample
        x0, eps = diffusion.predict_x0_and_eps(model_output, sample, t, ddim.alphas_cumprod, prediction_type)
        ours = diffusion.ddim_step(x0, eps, t - 20, ddim.alphas_cumprod)
        assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5), t
        per_sample_t = torch.tensor([t, t])
        assert torch.allclose(diffusion.ddim_step(x0, eps, per_sample_t - 20, ddim.alphas_cumprod), ours)
    # the end of the chain really uses alphas_cumprod[0] (set_alpha_to_one=False)
    x0, eps = torch.ones(1, 1), torch.ones(1, 1)
    a0 = float(ddim.alphas_cumprod[0])
    last = float(diffusion.ddim_step(x0, eps, -1, ddim.alphas_cumprod))
    assert math.isclose(last, a0**0.5 + (1 - a0) ** 0.5, rel_tol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_inverts_add_noise(ddpm, prediction_type):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, *LATENT_SHAPE, generator=gen)
    noise = torch.randn(3, *LATENT_SHAPE, generator=gen)
    t = torch.tensor([5, 500, 990])
    x_t = diffusion.add_noise(x0, noise, t, ddpm.alphas_cumprod)
    assert torch.allclose(x_t, ddpm.add_noise(x0, noise, t), atol=1e-6)
    a = ddpm.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    x0_pred, eps_pred = diffusion.predict_x0_and_eps(target, x_t, t, ddpm.alphas_cumprod, prediction_type)
    assert torch.allclose(x0_pred, x0, atol=1e-4)
    assert torch.allclose(eps_pred, noise, atol=1e-4)
    with pytest.raises(UserError, match="epsilon, v_prediction"):
        diffusion.predict_x0(target, x_t, t, ddpm.alphas_cumprod, "sample_typo")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_oracle_rollouts_return_x0(prediction_type):
    scheduler = make_scheduler(prediction_type=prediction_type)
    x0 = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(2))
    oracle = Oracle(x0, scheduler.alphas_cumprod, prediction_type)
    context = torch.randn(2, 3, 8)
    for name in ("ddim_cfg", "lcm"):
        out = diffusion.get_rollout(name)(
            oracle, context, torch.zeros_like(context), scheduler, LATENT_SHAPE, torch.Generator().manual_seed(0)
        )
        assert torch.allclose(out.x0, x0, atol=1e-4), name
    # a plain 50-step DDIM sampler built from the pieces, no guidance
    latents = torch.randn(2, *LATENT_SHAPE)
    for t in diffusion.ddim_timesteps(50):
        model_output = oracle(latents, torch.full((2,), t), context).sample
        x0_pred, eps = diffusion.predict_x0_and_eps(model_output, latents, t, scheduler.alphas_cumprod, prediction_type)
        latents = diffusion.ddim_step(x0_pred, eps, t - 20, scheduler.alphas_cumprod)
    a0 = scheduler.alphas_cumprod[0]
    assert torch.allclose(latents, a0.sqrt() * x0 + (1 - a0).sqrt() * eps, atol=1e-5)
    assert torch.allclose(x0_pred, x0, atol=1e-4)


def test_guided_is_lcm_cfg_form():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    assert torch.equal(diffusion.guided(u, c, 7.5), torch.tensor([1.0 + 7.5 * 2.0, -2.0 + 7.5 * 2.0]))


# ---------------------------------------------------------------- LCM pieces


def test_lcm_boundary_scalings_hand_computed():
    c_skip, c_out = diffusion.lcm_boundary_scalings(torch.tensor([0, 1, 19, 999]))
    # c_skip = 0.25 / ((10 t)^2 + 0.25); c_out = 10 t / sqrt((10 t)^2 + 0.25)
    assert torch.allclose(c_skip, torch.tensor([1.0, 0.25 / 100.25, 0.25 / 36100.25, 0.25 / 99800100.25]))
    assert torch.allclose(c_out, torch.tensor([0.0, 10 / 100.25**0.5, 190 / 36100.25**0.5, 9990 / 99800100.25**0.5]))
    # matches diffusers' LCMScheduler
    lcm = make_scheduler(LCMScheduler)
    for t in (0, 1, 19, 999):
        ref_skip, ref_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        ours_skip, ours_out = diffusion.lcm_boundary_scalings(t)
        assert math.isclose(float(ours_skip), ref_skip, rel_tol=1e-6, abs_tol=1e-12)
        assert math.isclose(float(ours_out), ref_out, rel_tol=1e-6, abs_tol=1e-12)
    x0, x_t = torch.full((1, 1), 2.0), torch.full((1, 1), -1.0)
    assert math.isclose(float(diffusion.lcm_output(x0, x_t, 1)), -0.25 / 100.25 + 2 * 10 / 100.25**0.5, rel_tol=1e-6)


def test_lcm_teacher_step_hand_computed(ddpm):
    a = ddpm.alphas_cumprod.double()
    latents = torch.tensor([[0.5]])
    cond, uncond = torch.tensor([[0.3]]), torch.tensor([[0.1]])
    for t, t_prev in ((519, 499), (19, 0), (10, 0)):
        at, ap = float(a[t]), float(a[t_prev])
        x = 0.5
        x0_c, x0_u = (x - (1 - at) ** 0.5 * 0.3) / at**0.5, (x - (1 - at) ** 0.5 * 0.1) / at**0.5
        x0 = x0_u + 7.5 * (x0_c - x0_u)
        eps = 0.1 + 7.5 * (0.3 - 0.1)
        expected = ap**0.5 * x0 + (1 - ap) ** 0.5 * eps
        got = diffusion.lcm_teacher_step(
            cond, uncond, latents, torch.tensor([t]), torch.tensor([t_prev]), ddpm.alphas_cumprod
        )
        assert math.isclose(float(got), expected, rel_tol=1e-5), (t, t_prev)


def test_sample_lcm_timesteps():
    start, prev = diffusion.sample_lcm_timesteps(4000, torch.Generator().manual_seed(0))
    assert start.dtype == torch.long and int(start.min()) == 10 and int(start.max()) == 999
    assert torch.equal(prev, (start - 20).clamp(min=0)) and int(prev.min()) == 0
    start, prev = diffusion.sample_lcm_timesteps(4000, torch.Generator().manual_seed(0), scheme="ddim_grid")
    assert set(start.tolist()) == set(range(19, 1000, 20))
    assert torch.equal(prev, (start - 20).clamp(min=0))
    again, _ = diffusion.sample_lcm_timesteps(4000, torch.Generator().manual_seed(0), scheme="ddim_grid")
    assert torch.equal(start, again)
    with pytest.raises(UserError, match="released, ddim_grid"):
        diffusion.sample_lcm_timesteps(2, scheme="uniform")
    for bad in (0, 1001):  # 1000 // 0 fails; above 1000 the step is 0, so t' = t and the target is the student's own
        with pytest.raises(UserError, match="--num_ddim_timesteps"):
            diffusion.sample_lcm_timesteps(2, num_ddim_timesteps=bad)


def test_losses_and_timesteps():
    a, b = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.0, 0.0, -1.0])
    assert math.isclose(float(diffusion.mse(a, b)), (0 + 1 + 16) / 3, rel_tol=1e-6)
    c = 0.001
    expected = ((0 + c**2) ** 0.5 - c + (1 + c**2) ** 0.5 - c + (16 + c**2) ** 0.5 - c) / 3
    assert math.isclose(float(diffusion.pseudo_huber(a, b)), expected, rel_tol=1e-6)
    assert diffusion.get_loss("pseudo_huber") is diffusion.pseudo_huber
    with pytest.raises(UserError, match="mse, pseudo_huber"):
        diffusion.get_loss("l1")
    t = diffusion.sample_timesteps(5000, torch.Generator().manual_seed(3))
    assert t.dtype == torch.long and int(t.min()) == 0 and int(t.max()) == 999
    assert torch.equal(t, diffusion.sample_timesteps(5000, torch.Generator().manual_seed(3)))


# ---------------------------------------------------------------- rollouts with a real (tiny) UNet


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = tiny_unet()
    model.eval()
    return model


def contexts(batch=1, length=6):
    gen = torch.Generator().manual_seed(5)
    return torch.randn(batch, length, 32, generator=gen), torch.randn(batch, length, 32, generator=gen)


def test_ddim_cfg_rollout_matches_diffusers_ddim(unet, ddpm):
    """Real (tiny) UNet, 10-step grid 999, 899, ..., 99 to keep CPU time low; the 50-step grid is
    compared against diffusers in test_ddim_cfg_gradient_matches_reference."""
    cond, uncond = contexts()
    settings = diffusion.RolloutSettings(rollout_steps=10, grad_steps=1)
    with torch.no_grad():
        out = diffusion.ddim_cfg_rollout(
            unet, cond, uncond, ddpm, LATENT_SHAPE, torch.Generator().manual_seed(7), settings
        )
    ddim = make_scheduler(DDIMScheduler, timestep_spacing="trailing")
    ddim.set_timesteps(10)
    latents = torch.randn(1, *LATENT_SHAPE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for t in ddim.timesteps:
            noise_pred = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([cond, uncond])).sample
            eps_c, eps_u = noise_pred.chunk(2)
            step = ddim.step(eps_u + 7.5 * (eps_c - eps_u), t, latents, eta=0.0)
            latents = step.prev_sample
    assert out.timesteps == ddim.timesteps.tolist() == list(range(999, 0, -100))
    assert torch.allclose(out.x0, step.pred_original_sample, atol=1e-4, rtol=1e-4)


def test_ddim_cfg_rollout_grad_steps(unet, ddpm):
    cond, uncond = contexts()
    counting = CountingUNet(ScalarModel())
    out = diffusion.ddim_cfg_rollout(counting, cond, uncond, ddpm, LATENT_SHAPE, torch.Generator().manual_seed(11))
    calls = counting.calls
    assert len(calls) == 50 and all(batch == 2 for _, _, batch, _ in calls)  # CFG: one call of 2B per step
    grad_calls = [i for i, (grad, _, _, _) in enumerate(calls) if grad]
    r = grad_calls[0]
    assert 0 <= r < 10 and grad_calls == [r, r + 10, r + 20, r + 30, r + 40] == out.grad_step_indices
    assert not any(requires_grad for _, requires_grad, _, _ in calls)  # UNet inputs are detached
    assert [t for *_, t in calls] == list(range(999, 0, -20))
    assert out.x0.shape == (1, *LATENT_SHAPE) and out.x0.requires_grad

    # r takes every value 0..9 (100 draws; a 10-step rollout, no grad, keeps them cheap); the
    # benchmark option puts every step under grad
    settings = diffusion.RolloutSettings(rollout_steps=10, grad_steps=1, grad_stride=10)
    with torch.no_grad():
        indices = {
            diffusion.ddim_cfg_rollout(
                ScalarModel(), cond, uncond, ddpm, LATENT_SHAPE, torch.Generator().manual_seed(s), settings
            ).grad_step_indices[0]
            for s in range(100)
        }
    assert indices == set(range(10))
    counting = CountingUNet(ScalarModel())
    settings = diffusion.RolloutSettings(grad_all_steps=True)
    diffusion.ddim_cfg_rollout(counting, cond, uncond, ddpm, LATENT_SHAPE, torch.Generator().manual_seed(0), settings)
    assert sum(grad for grad, *_ in counting.calls) == 50

    # a loss on the output reaches every parameter of a real UNet (checkpointed calls)
    counting = CountingUNet(unet)
    settings = diffusion.RolloutSettings(rollout_steps=10, grad_steps=2, grad_stride=5)
    gen = torch.Generator().manual_seed(1)
    out = diffusion.ddim_cfg_rollout(counting, cond, uncond, ddpm, LATENT_SHAPE, gen, settings)
    counting.recording = False  # checkpoint recomputes the grad calls during backward
    assert [i for i, (grad, *_) in enumerate(counting.calls) if grad] == out.grad_step_indices
    unet.zero_grad()
    out.x0.square().mean().backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    unet.zero_grad()


def reference_gradient(model, cond, uncond, noise, grad_index, cfg=7.5):
    """Released rollout written with diffusers' DDIMScheduler.step (differentiable arithmetic)."""
    ddim = make_scheduler(DDIMScheduler, timestep_spacing="trailing")
    ddim.set_timesteps(50)
    latents = noise
    for i, t in enumerate(ddim.timesteps):
        x_in, ctx = torch.cat([latents] * 2), torch.cat([cond, uncond])
        t_in = torch.full((2 * latents.shape[0],), int(t))
        if i == grad_index:
            noise_pred = model(x_in.detach(), t_in, ctx).sample
        else:
            with torch.no_grad():
                noise_pred = model(x_in, t_in, ctx).sample
        eps_c, eps_u = noise_pred.chunk(2)
        step = ddim.step(eps_u + cfg * (eps_c - eps_u), t, latents, eta=0.0)
        latents = step.prev_sample
    grads = torch.autograd.grad(step.pred_original_sample.square().mean(), [model.p, model.q])
    return step.pred_original_sample.detach(), grads


def test_ddim_cfg_gradient_matches_reference(ddpm):
    """Gradient from a single grad step also flows through the later no-grad steps' DDIM updates."""
    cond, uncond = contexts(batch=2)
    model = ScalarModel()
    settings = diffusion.RolloutSettings(grad_steps=1, grad_stride=50)
    gen = torch.Generator().manual_seed(3)
    out = diffusion.ddim_cfg_rollout(model, cond, uncond, ddpm, LATENT_SHAPE, gen, settings)
    (index,) = out.grad_step_indices
    ours = torch.autograd.grad(out.x0.square().mean(), [model.p, model.q])
    noise = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(3))
    expected_x0, expected = reference_gradient(model, cond, uncond, noise, index)
    assert torch.allclose(out.x0.detach(), expected_x0, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours, expected):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert index < 49 and float(ours[0].abs()) > 0


def test_lcm_rollout_matches_lcm_scheduler_and_grads(unet, ddpm):
    cond, _ = contexts()
    counting = CountingUNet(unet)
    out = diffusion.lcm_rollout(counting, cond, None, ddpm, LATENT_SHAPE, torch.Generator().manual_seed(4))
    counting.recording = False
    assert [grad for grad, *_ in counting.calls] == [True] * 4
    assert [t for *_, t in counting.calls] == [999, 749, 499, 249] == out.timesteps
    assert not any(requires_grad for _, requires_grad, _, _ in counting.calls)

    lcm = make_scheduler(LCMScheduler)
    lcm.set_timesteps(timesteps=[999, 749, 499, 249])
    gen = torch.Generator().manual_seed(4)
    latents = torch.randn(1, *LATENT_SHAPE, generator=gen)
    with torch.no_grad():
        for t in lcm.timesteps:
            step = lcm.step(unet(latents, t, encoder_hidden_states=cond).sample, t, latents, generator=gen)
            latents = step.prev_sample
    assert torch.allclose(out.x0.detach(), step.denoised, atol=1e-4, rtol=1e-4)

    unet.zero_grad()
    out.x0.square().mean().backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    unet.zero_grad()


def test_lcm_rollout_denoises_to_the_plain_x0_prediction_by_default(ddpm):
    """METHOD.md §5 (as released): the rollout re-noises and returns the x0 prediction itself; the
    boundary scalings are an option. At t = 1 they differ visibly (c_skip = 0.0025)."""
    cond, _ = contexts()
    model = ScalarModel()
    outputs = {}
    with torch.no_grad():
        for name, scalings in [("default", None), ("plain", False), ("scaled", True)]:
            settings = diffusion.RolloutSettings(lcm_timesteps=(999, 1))
            if scalings is not None:
                settings.lcm_boundary_scalings = scalings
            outputs[name] = diffusion.lcm_rollout(model, cond, None, ddpm, LATENT_SHAPE, torch.Generator().manual_seed(3), settings).x0
    assert torch.equal(outputs["default"], outputs["plain"])
    assert not torch.allclose(outputs["default"], outputs["scaled"], rtol=1e-4, atol=1e-4)


def test_same_seed_same_output(ddpm):
    cond, uncond = contexts()
    model = ScalarModel()
    for name in ROLLOUT_NAMES:
        rollout = diffusion.get_rollout(name)
        with torch.no_grad():
            a = rollout(model, cond, uncond, ddpm, LATENT_SHAPE, torch.Generator().manual_seed(9))
            b = rollout(model, cond, uncond, ddpm, LATENT_SHAPE, torch.Generator().manual_seed(9))
            c = rollout(model, cond, uncond, ddpm, LATENT_SHAPE, torch.Generator().manual_seed(10))
        assert torch.equal(a.x0, b.x0) and a.grad_step_indices == b.grad_step_indices
        assert not torch.allclose(a.x0, c.x0)


def test_registry_and_settings_errors(ddpm):
    assert set(diffusion.ROLLOUTS) == set(ROLLOUT_NAMES)
    with pytest.raises(UserError, match="ddim_cfg, lcm"):
        diffusion.get_rollout("ddpm")
    with pytest.raises(UserError, match="exceeds --rollout_steps 50"):
        diffusion.RolloutSettings(grad_steps=6)
    with pytest.raises(UserError, match="--rollout_steps must divide"):
        diffusion.RolloutSettings(rollout_steps=33, grad_steps=1)
    with pytest.raises(UserError, match="descending"):
        diffusion.RolloutSettings(lcm_timesteps=(249, 999))
    cond, _ = contexts()
    with pytest.raises(UserError, match="uncond_encoder_hidden_states"):
        diffusion.ddim_cfg_rollout(ScalarModel(), cond, None, ddpm, LATENT_SHAPE)
