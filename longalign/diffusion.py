"""Diffusion math and the two differentiable rollouts of the reward stages (METHOD.md §5).

Everything here is plain torch on top of a diffusers noise scheduler: the schedule
(`alphas_cumprod`, `config.prediction_type`, `config.num_train_timesteps`) comes from the
scheduler the stage loads (SD1.5: scaled_linear 0.00085..0.012, 1000 steps, epsilon), and the
update rules are checked in the tests against diffusers' own `DDIMScheduler.step` and
`LCMScheduler.step`.

Conventions: latents are (B, C, h, w); timesteps are integer tensors (B,) or Python ints; the
schedule coefficients are taken in float32, so solver results are float32 whatever the UNet's
dtype; the UNet is called with latents cast to the dtype of `encoder_hidden_states`. A timestep
below 0 stands for "after the last step", whose alpha is `alphas_cumprod[0]` (SD1.5's
`set_alpha_to_one=False`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers.utils.torch_utils import randn_tensor

from .loading import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction")
LCM_TIMESTEP_SCHEMES = ("released", "ddim_grid")


# --------------------------------------------------------------------------------------------
# Schedule arithmetic
# --------------------------------------------------------------------------------------------


def _alpha(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar at `timesteps` (t < 0 -> alphas_cumprod[0]) as float32 (B, 1, ..., 1) on like's device.

    An int timestep indexes the table directly (no host-to-device copy: the rollouts call this
    about 200 times a step), so a table already on like's device costs no copy at all.
    """
    table = alphas_cumprod.to(device=like.device, dtype=torch.float32)
    if isinstance(timesteps, int):
        alpha = table[max(timesteps, 0)].reshape(1)
    else:
        t = torch.as_tensor(timesteps, device=like.device, dtype=torch.long).reshape(-1)
        alpha = table[t.clamp(min=0)]
    if alpha.shape[0] == 1 and like.shape[0] != 1:
        alpha = alpha.expand(like.shape[0])
    return alpha.reshape(-1, *([1] * (like.ndim - 1)))


def check_prediction_type(prediction_type: str) -> None:
    """A `UserError` unless the scheduler's `prediction_type` is one the losses and solvers handle."""
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(
            f"unsupported prediction_type '{prediction_type}'; choose one of: {', '.join(PREDICTION_TYPES)}"
        )


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | int, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Forward diffusion `x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise` (DDPM, same as the scheduler's
    `add_noise`). Shapes: x0, noise (B, C, h, w); timesteps (B,) or an int. Returns float32."""
    alpha = _alpha(alphas_cumprod, timesteps, x0)
    return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise


def predict_x0_and_eps(
    model_output: torch.Tensor,
    latents: torch.Tensor,
    timesteps: torch.Tensor | int,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean-latent and noise predictions (x0, eps) implied by a UNet output at x_t.

    epsilon: x0 = (x_t - sqrt(1-a) eps) / sqrt(a); v_prediction: x0 = sqrt(a) x_t - sqrt(1-a) v,
    eps = sqrt(a) v + sqrt(1-a) x_t (as in diffusers' DDIM/LCM schedulers). Shapes: model_output
    and latents (B, C, h, w), timesteps (B,) or int. Returns two float32 tensors (B, C, h, w).
    """
    check_prediction_type(prediction_type)
    alpha = _alpha(alphas_cumprod, timesteps, latents)
    sqrt_a, sqrt_1ma = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction_type == "epsilon":
        eps = model_output.float()
        x0 = (latents - sqrt_1ma * model_output) / sqrt_a
    else:
        x0 = sqrt_a * latents - sqrt_1ma * model_output
        eps = sqrt_a * model_output + sqrt_1ma * latents
    return x0, eps


def predict_x0(
    model_output: torch.Tensor,
    latents: torch.Tensor,
    timesteps: torch.Tensor | int,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """The x0 (clean latent) prediction of `predict_x0_and_eps`; (B, C, h, w) float32."""
    return predict_x0_and_eps(model_output, latents, timesteps, alphas_cumprod, prediction_type)[0]


def ddim_step(
    x0: torch.Tensor, eps: torch.Tensor, timesteps_prev: torch.Tensor | int, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """One deterministic DDIM step (eta 0) to `timesteps_prev`: `sqrt(a') x0 + sqrt(1 - a') eps`.

    `timesteps_prev < 0` means the end of the chain, alpha' = alphas_cumprod[0] (SD1.5's
    `set_alpha_to_one=False`), which equals diffusers `DDIMScheduler.step` with eta 0 and no
    clipping. This is also the LCM distillation's DDIM solver step t -> t' (METHOD.md §5).
    Shapes: x0, eps (B, C, h, w); timesteps_prev (B,) or int. Returns float32 (B, C, h, w).
    """
    alpha_prev = _alpha(alphas_cumprod, timesteps_prev, x0)
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps


def guided(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance `uncond + w (cond - uncond)`. Used on eps for the DDIM rollout and,
    in LCM's form, on both x0 and eps for the LCM teacher (METHOD.md §5). `w` is a float or a
    tensor broadcastable to the inputs (e.g. (B, 1, 1, 1))."""
    return uncond + guidance_scale * (cond - uncond)


def ddim_timesteps(num_inference_steps: int = 50, num_train_timesteps: int = 1000) -> list[int]:
    """The rollout grid `T-1, T-1-k, ..., k-1` with k = T / steps: for 50 steps over 1000,
    999, 979, ..., 19 (METHOD.md §5) — diffusers' DDIM 'trailing' spacing. Ends with k-1, whose
    next step (t - k < 0) lands on alphas_cumprod[0]."""
    if num_inference_steps < 1 or num_train_timesteps % num_inference_steps:
        raise UserError(
            f"num_inference_steps={num_inference_steps} must be >= 1 and divide "
            f"num_train_timesteps={num_train_timesteps}"
        )
    stride = num_train_timesteps // num_inference_steps
    return list(range(num_train_timesteps - 1, -1, -stride))


# --------------------------------------------------------------------------------------------
# LCM distillation pieces
# --------------------------------------------------------------------------------------------


def lcm_boundary_scalings(
    timesteps: torch.Tensor | int, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM boundary-condition scalings (METHOD.md §5): with s = timestep_scaling,
    `c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2)`, `c_out = s t / sqrt((s t)^2 + sigma_data^2)`,
    so c_skip(0) = 1, c_out(0) = 0. Returns two float32 tensors shaped like `timesteps`."""
    scaled = torch.as_tensor(timesteps, dtype=torch.float32) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def lcm_output(
    x0_pred: torch.Tensor,
    latents: torch.Tensor,
    timesteps: torch.Tensor | int,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """The consistency model's denoised output `c_skip(t) x_t + c_out(t) x0_pred` (METHOD.md §5).
    Shapes: x0_pred, latents (B, C, h, w); timesteps (B,) or int. Returns float32 (B, C, h, w)."""
    c_skip, c_out = lcm_boundary_scalings(timesteps, sigma_data, timestep_scaling)
    shape = (-1, *([1] * (latents.ndim - 1)))
    c_skip = c_skip.to(latents.device).reshape(shape)
    c_out = c_out.to(latents.device).reshape(shape)
    return c_skip * latents + c_out * x0_pred


def sample_lcm_timesteps(
    batch_size: int,
    generator: torch.Generator | None = None,
    scheme: str = "released",
    num_train_timesteps: int = 1000,
    num_ddim_timesteps: int = 50,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Start timesteps t and solver targets t' = max(t - k, 0), k = T / num_ddim_timesteps (20).

    `scheme="released"` (default, the LongAlign release and METHOD.md §5): t uniform over the
    integers 10..T-1. `scheme="ddim_grid"` (diffusers' train_lcm_distill_lora_sd.py DDIMSolver):
    t uniform over the 50-step grid (i + 1) k - 1 = 19, 39, ..., 999. In both, t' is clamped at
    0 as both recipes do; the DDIM step to t' = 0 uses alphas_cumprod[0], the same alpha the
    solver uses for "t' < 0". Returns two long tensors (B,) on `device`.
    """
    if scheme not in LCM_TIMESTEP_SCHEMES:
        raise UserError(f"unknown LCM timestep scheme '{scheme}'; choose one of: {', '.join(LCM_TIMESTEP_SCHEMES)}")
    if not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise UserError(f"--num_ddim_timesteps must be in [1, {num_train_timesteps}] (got {num_ddim_timesteps})")
    step = num_train_timesteps // num_ddim_timesteps
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if scheme == "released":
        start = torch.randint(10, num_train_timesteps, (batch_size,), generator=generator, device=gen_device)
    else:
        index = torch.randint(0, num_ddim_timesteps, (batch_size,), generator=generator, device=gen_device)
        start = (index + 1) * step - 1
    start = start.to(device=device if device is not None else gen_device, dtype=torch.long)
    return start, (start - step).clamp(min=0)


def sample_timesteps(
    batch_size: int,
    generator: torch.Generator | None = None,
    low: int = 0,
    high: int = 1000,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training timesteps uniform over the integers low..high-1 (align stage: [0, 1000)), drawn
    from `generator` (on its device) and moved to `device`. Returns a long tensor (B,)."""
    if not 0 <= low < high:
        raise UserError(f"timestep range [{low}, {high}) is empty or negative")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    t = torch.randint(low, high, (batch_size,), generator=generator, device=gen_device)
    return t.to(device=device if device is not None else gen_device)


def lcm_teacher_step(
    cond_output: torch.Tensor,
    uncond_output: torch.Tensor,
    latents: torch.Tensor,
    timesteps: torch.Tensor | int,
    timesteps_prev: torch.Tensor | int,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
    guidance_scale: float | torch.Tensor = 7.5,
) -> torch.Tensor:
    """The LCM distillation's teacher move x_t -> x_t' (METHOD.md §5): x0 and eps of the teacher's
    conditional and unconditional outputs, both guided in LCM's form (`x0 = x0_u + w (x0_c - x0_u)`,
    same for eps), then one DDIM step to t'. Shapes: outputs and latents (B, C, h, w); timesteps
    (B,). Returns float32 (B, C, h, w)."""
    x0_c, eps_c = predict_x0_and_eps(cond_output, latents, timesteps, alphas_cumprod, prediction_type)
    x0_u, eps_u = predict_x0_and_eps(uncond_output, latents, timesteps, alphas_cumprod, prediction_type)
    return ddim_step(
        guided(x0_u, x0_c, guidance_scale), guided(eps_u, eps_c, guidance_scale), timesteps_prev, alphas_cumprod
    )


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 (align stage loss on eps, METHOD.md §5). Returns a scalar."""
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """Pseudo-Huber loss `mean(sqrt((a - b)^2 + c^2) - c)` in float32 (lcm stage, option of align;
    METHOD.md §5, c = 0.001). Returns a scalar."""
    diff = prediction.float() - target.float()
    return (torch.sqrt(diff**2 + c**2) - c).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"mse": mse, "pseudo_huber": pseudo_huber}


def get_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Look up a training loss by name in `LOSSES` ('mse', 'pseudo_huber'); UserError otherwise."""
    if name not in LOSSES:
        raise UserError(f"unknown --loss '{name}'; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name]


# --------------------------------------------------------------------------------------------
# Differentiable rollouts (reward stages)
# --------------------------------------------------------------------------------------------


@dataclass
class RolloutSettings:
    """Options of the differentiable rollouts; defaults are the released recipe (METHOD.md §5)."""

    rollout_steps: int = field(
        default=50, metadata={"help": "ddim_cfg: DDIM steps over the 1000 training steps (grid 999, 979, ..., 19)."}
    )
    guidance_scale: float = field(default=7.5, metadata={"help": "ddim_cfg: classifier-free guidance scale w."})
    grad_steps: int = field(default=5, metadata={"help": "ddim_cfg: number of steps whose UNet call carries gradient."})
    grad_stride: int = field(
        default=10, metadata={"help": "ddim_cfg: grad steps are r, r+stride, ... with r uniform in 0..stride-1."}
    )
    grad_all_steps: bool = field(
        default=False, metadata={"help": "ddim_cfg: every UNet call with gradient (benchmark comparison only)."}
    )
    lcm_timesteps: tuple[int, ...] = field(
        default=(999, 749, 499, 249), metadata={"help": "lcm: timesteps of the 4-step LCM rollout."}
    )
    lcm_boundary_scalings: bool = field(
        default=False,
        metadata={
            "help": "lcm: denoise to the plain x0 prediction, as released (False), or to c_skip x_t + c_out x0 as "
            "diffusers' LCMScheduler does (True); at t >= 249 the two differ by < 1e-7 relative."
        },
    )
    checkpoint_grad_steps: bool = field(
        default=True, metadata={"help": "Checkpoint every UNet call that carries gradient (use_reentrant=False)."}
    )

    def __post_init__(self) -> None:
        # Named as the reward stages' flags. 1000: SD1.5's training steps (the rollout checks the scheduler's).
        if self.rollout_steps < 1 or 1000 % self.rollout_steps:
            raise UserError(f"--rollout_steps must divide the 1000 training timesteps (got {self.rollout_steps})")
        if self.grad_steps < 1 or self.grad_stride < 1:
            raise UserError(f"--grad_steps ({self.grad_steps}) and --grad_stride ({self.grad_stride}) must be >= 1")
        if self.grad_steps * self.grad_stride > self.rollout_steps:
            raise UserError(
                f"--grad_steps x --grad_stride = {self.grad_steps * self.grad_stride} exceeds --rollout_steps "
                f"{self.rollout_steps}: the last step with gradient, r + stride (grad_steps - 1), must be in the rollout"
            )
        steps = list(self.lcm_timesteps)
        if not steps or any(b >= a for a, b in zip(steps, steps[1:])) or steps[-1] < 0:
            raise UserError(f"lcm_timesteps {self.lcm_timesteps} must be non-empty, non-negative and descending")
        self.lcm_timesteps = tuple(int(t) for t in steps)


@dataclass
class RolloutOutput:
    """Result of a rollout: `x0` (B, C, h, w) float32, the last step's (denoised) x0 prediction,
    differentiable w.r.t. the UNet's trainable parameters; `timesteps` of all steps in order;
    `grad_step_indices` the step indices whose UNet call carried gradient."""

    x0: torch.Tensor
    timesteps: list[int]
    grad_step_indices: list[int]


class UNetLike(Protocol):
    """What the rollouts call: a diffusers `UNet2DConditionModel` (or a wrapper of one) returning
    an object with `.sample` (B, C, h, w) for latents (B, C, h, w), timesteps (B,), contexts (B, L, D)."""

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> Any: ...


def _call_unet(
    unet: UNetLike, latents: torch.Tensor, timestep: int, encoder_hidden_states: torch.Tensor, with_grad: bool,
    checkpoint: bool,
) -> torch.Tensor:
    """One UNet call at a single timestep for the whole batch; with grad: input detached and the
    call optionally checkpointed; without: under torch.no_grad. Returns the UNet's `.sample`."""
    sample = latents.detach().to(encoder_hidden_states.dtype)
    t = torch.full((sample.shape[0],), timestep, device=sample.device, dtype=torch.long)

    def forward(x: torch.Tensor, tt: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return unet(x, tt, encoder_hidden_states=context).sample

    if not with_grad:
        with torch.no_grad():
            return forward(sample, t, encoder_hidden_states)
    if checkpoint:
        return torch.utils.checkpoint.checkpoint(forward, sample, t, encoder_hidden_states, use_reentrant=False)
    return forward(sample, t, encoder_hidden_states)


def _initial_noise(
    generator: torch.Generator | None, batch_size: int, latent_shape: tuple[int, int, int], device: torch.device
) -> torch.Tensor:
    return randn_tensor((batch_size, *latent_shape), generator=generator, device=device, dtype=torch.float32)


def _schedule(noise_scheduler: Any) -> tuple[torch.Tensor, str, int]:
    prediction_type = noise_scheduler.config.prediction_type
    check_prediction_type(prediction_type)
    return noise_scheduler.alphas_cumprod, prediction_type, int(noise_scheduler.config.num_train_timesteps)


def ddim_cfg_rollout(
    unet: UNetLike,
    encoder_hidden_states: torch.Tensor,
    uncond_encoder_hidden_states: torch.Tensor | None,
    noise_scheduler: Any,
    latent_shape: tuple[int, int, int],
    generator: torch.Generator | None = None,
    settings: RolloutSettings | None = None,
) -> RolloutOutput:
    """The `reward` stage rollout (METHOD.md §5): DDIM (eta 0) with CFG from pure noise.

    Starting from noise (B, *latent_shape) drawn from `generator`, run DDIM over t = 999, 979, ...,
    19 with `eps = eps_u + w (eps_c - eps_u)`; cond and uncond go through the UNet as ONE call of
    batch 2B ([cond; uncond]), so the rollout makes 50 UNet calls. Only the calls at step indices
    r, r + 10, ..., r + 40 (r uniform in 0..9, drawn from `generator` after the noise) carry
    gradient: their input latents are detached and the call is checkpointed; all other calls run
    under no_grad. The solver arithmetic is always recorded, so gradient from a grad step also
    reaches the output through the (linear) DDIM updates of the later steps, as in the release.
    Contexts: (B, L, D). Returns `RolloutOutput` with the last step's x0 prediction (B, C, h, w).
    """
    settings = settings or RolloutSettings()
    alphas_cumprod, prediction_type, num_train_timesteps = _schedule(noise_scheduler)
    timesteps = ddim_timesteps(settings.rollout_steps, num_train_timesteps)
    stride = num_train_timesteps // settings.rollout_steps
    use_cfg = settings.guidance_scale != 1.0
    if use_cfg:
        if uncond_encoder_hidden_states is None or uncond_encoder_hidden_states.shape != encoder_hidden_states.shape:
            raise UserError(
                "ddim_cfg rollout with guidance_scale != 1 needs uncond_encoder_hidden_states shaped like "
                f"encoder_hidden_states {tuple(encoder_hidden_states.shape)}"
            )
        context = torch.cat([encoder_hidden_states, uncond_encoder_hidden_states])  # (2B, L, D)
    else:
        context = encoder_hidden_states
    batch_size = encoder_hidden_states.shape[0]
    latents = _initial_noise(generator, batch_size, latent_shape, encoder_hidden_states.device)

    if settings.grad_all_steps:
        grad_indices = list(range(len(timesteps)))
    else:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        r = int(torch.randint(0, settings.grad_stride, (1,), generator=generator, device=gen_device))
        grad_indices = [r + settings.grad_stride * k for k in range(settings.grad_steps)]

    x0 = latents
    for index, t in enumerate(timesteps):
        unet_input = torch.cat([latents, latents]) if use_cfg else latents  # (2B, C, h, w) with CFG
        model_output = _call_unet(
            unet, unet_input, t, context, index in grad_indices, settings.checkpoint_grad_steps
        )
        x0_both, eps_both = predict_x0_and_eps(
            model_output, unet_input, t, alphas_cumprod, prediction_type
        )
        if use_cfg:  # guide x0 and eps alike; both are affine in the UNet output at fixed latents
            x0_c, x0_u = x0_both.chunk(2)
            eps_c, eps_u = eps_both.chunk(2)
            x0 = guided(x0_u, x0_c, settings.guidance_scale)
            eps = guided(eps_u, eps_c, settings.guidance_scale)
        else:
            x0, eps = x0_both, eps_both
        latents = ddim_step(x0, eps, t - stride, alphas_cumprod)
    return RolloutOutput(x0=x0, timesteps=timesteps, grad_step_indices=grad_indices)


def lcm_rollout(
    unet: UNetLike,
    encoder_hidden_states: torch.Tensor,
    uncond_encoder_hidden_states: torch.Tensor | None,
    noise_scheduler: Any,
    latent_shape: tuple[int, int, int],
    generator: torch.Generator | None = None,
    settings: RolloutSettings | None = None,
) -> RolloutOutput:
    """The `reward_lcm` stage rollout (METHOD.md §5): 4-step LCM sampling at t = 999, 749, 499, 249.

    Starting from noise (B, *latent_shape) drawn from `generator`, every step calls the LCM UNet
    once on the conditional context only (no CFG; `uncond_encoder_hidden_states` is ignored) with
    gradient (input detached, call checkpointed), takes its x0 prediction (METHOD.md §5, as released;
    `RolloutSettings.lcm_boundary_scalings` applies the LCM boundary scalings) and, before the next step,
    re-noises x0 to the next timestep with fresh noise from `generator` — the same draws, in the
    same order, as diffusers' `LCMScheduler` with these custom timesteps. Returns `RolloutOutput`
    with the last denoised x0 (B, C, h, w).
    """
    del uncond_encoder_hidden_states
    settings = settings or RolloutSettings()
    alphas_cumprod, prediction_type, _ = _schedule(noise_scheduler)
    timesteps = list(settings.lcm_timesteps)
    batch_size = encoder_hidden_states.shape[0]
    device = encoder_hidden_states.device
    latents = _initial_noise(generator, batch_size, latent_shape, device)
    x0 = latents
    for index, t in enumerate(timesteps):
        model_output = _call_unet(unet, latents, t, encoder_hidden_states, True, settings.checkpoint_grad_steps)
        x0 = predict_x0(model_output, latents, t, alphas_cumprod, prediction_type)
        if settings.lcm_boundary_scalings:
            x0 = lcm_output(x0, latents, t)
        if index + 1 < len(timesteps):
            noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=torch.float32)
            latents = add_noise(x0, noise, timesteps[index + 1], alphas_cumprod)
    return RolloutOutput(x0=x0, timesteps=timesteps, grad_step_indices=list(range(len(timesteps))))


Rollout = Callable[..., RolloutOutput]

ROLLOUTS: dict[str, Rollout] = {"ddim_cfg": ddim_cfg_rollout, "lcm": lcm_rollout}


def get_rollout(name: str) -> Rollout:
    """Look up a differentiable rollout by name in `ROLLOUTS` ('ddim_cfg' for the reward stage,
    'lcm' for reward_lcm); an unknown name is a UserError naming the choices."""
    if name not in ROLLOUTS:
        raise UserError(f"unknown rollout '{name}'; choose one of: {', '.join(ROLLOUTS)}")
    return ROLLOUTS[name]
