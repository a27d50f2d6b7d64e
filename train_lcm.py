"""Stage `lcm`: 4-step LCM-LoRA distillation of the align model (METHOD.md §5).

The student is the align-fused UNet with a new LoRA; the teacher is the same UNet with the LoRA
switched off (frozen). From x_t at t uniform in [10, 1000), the teacher takes one guided DDIM step
to t' = t - 20 (CFG 7.5 in LCM's form); the consistency target is the student's own denoised
output at (x_t', t') under no_grad (no EMA target, as released). Loss: pseudo-Huber, c = 0.001.

    bash run_unet.sh lcm NAME    # --init_from runs/align-NAME/final
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from longalign.config import LcmArguments, ModelArguments
from longalign.data import build_train_dataset
from longalign.diffusion import (
    lcm_output,
    lcm_teacher_step,
    predict_x0,
    pseudo_huber,
    sample_lcm_timesteps,
)
from longalign.loading import cli_entry
from longalign.training import (
    Stage,
    StageParts,
    ValidationSettings,
    check_output_dir,
    encode_images,
    encode_prompts_and_unconditional,
    load_stage_parts,
    make_accelerator,
    parse_stage_arguments,
    randn_like,
    run_training,
)

STAGE = "lcm"


@contextmanager
def lora_disabled(unet):
    """The frozen teacher: the same UNet with its trainable LoRA switched off."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def denoised(unet, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, scheduler) -> torch.Tensor:
    """The consistency function f(x_t, t) = c_skip x_t + c_out x0_pred. (B, 4, h, w) float32."""
    output = unet(latents.to(context.dtype), timesteps, encoder_hidden_states=context).sample
    x0 = predict_x0(output, latents, timesteps, scheduler.alphas_cumprod, scheduler.config.prediction_type)
    return lcm_output(x0, latents, timesteps)


def lcm_loss(parts: StageParts, batch: dict, generator: torch.Generator, args: LcmArguments, teacher_unet):
    """Pseudo-Huber distance between f(x_t, t) and the no-grad target f(x_t', t') (METHOD.md §5).

    latents (B, 4, h, w); context (B, 480, 768); the teacher sees cond and uncond contexts.
    """
    latents = encode_images(parts.vae, batch["pixel_values"], generator).float()
    batch_size = latents.shape[0]
    context, uncond = encode_prompts_and_unconditional(parts, batch["caption"], batch.get("segments"))
    scheduler = parts.noise_scheduler
    start, previous = sample_lcm_timesteps(
        batch_size, generator, num_train_timesteps=scheduler.config.num_train_timesteps,
        num_ddim_timesteps=args.num_ddim_timesteps, device=latents.device,
    )
    noise = randn_like(latents, generator)
    noisy_latents = scheduler.add_noise(latents, noise, start)

    prediction = denoised(parts.unet, noisy_latents, start, context, scheduler)
    with torch.no_grad():
        with lora_disabled(teacher_unet) as teacher:
            cond_output = teacher(noisy_latents.to(context.dtype), start, encoder_hidden_states=context).sample
            uncond_output = teacher(noisy_latents.to(context.dtype), start, encoder_hidden_states=uncond).sample
        previous_latents = lcm_teacher_step(
            cond_output, uncond_output, noisy_latents, start, previous, scheduler.alphas_cumprod,
            scheduler.config.prediction_type, args.teacher_guidance_scale,
        )
        target = denoised(parts.unet, previous_latents, previous, context, scheduler)
    return pseudo_huber(prediction, target, args.huber_c), {}


def build_stage(model_args: ModelArguments, args: LcmArguments, accelerator) -> Stage:
    """The align-fused UNet with a new LoRA `lcm` (student); the same UNet with it off is the teacher."""
    parts = load_stage_parts(model_args, args, accelerator, lora_name=STAGE)
    teacher_unet = parts.unet  # the unwrapped module: LoRA toggled off for the teacher's calls
    loss_fn = functools.partial(lcm_loss, args=args, teacher_unet=teacher_unet)
    return Stage(STAGE, parts, {"unet": parts.unet}, loss_fn, ValidationSettings(sampler="lcm"))


@cli_entry
def main(argv: list[str] | None = None) -> None:
    model_args, args = parse_stage_arguments(LcmArguments, argv)
    check_output_dir(model_args, args, STAGE)  # a used --output_dir fails before any model loads
    dataset = build_train_dataset(args)  # a wrong --dataset or --image_root fails before any model loads
    accelerator = make_accelerator(args)
    run_training(model_args, args, accelerator, build_stage(model_args, args, accelerator), dataset)


if __name__ == "__main__":
    main()
