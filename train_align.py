"""Stage `align`: teach SD1.5 long prompts (paper §3; METHOD.md §5).

Trains a UNet LoRA and the T5 adapter with the standard noise-prediction loss, conditioning the
UNet on the segment-level CLIP + adapter(T5) context of each (long) caption. Captions are
dropped to "" with probability 0.1 so the model keeps an unconditional mode for CFG.

    bash run_unet.sh align NAME        # or: accelerate launch train_align.py --output_dir runs/align-NAME ...
"""

from __future__ import annotations

import functools

import torch

from longalign.config import AlignArguments, ModelArguments
from longalign.data import build_train_dataset
from longalign.diffusion import check_prediction_type, mse, pseudo_huber, sample_timesteps
from longalign.loading import cli_entry
from longalign.pipeline import LAVI_BRIDGE_ADAPTER
from longalign.training import (
    Stage,
    StageParts,
    ValidationSettings,
    check_output_dir,
    encode_images,
    load_stage_parts,
    make_accelerator,
    parse_stage_arguments,
    randn_like,
    run_training,
)

STAGE = "align"


def align_loss(parts: StageParts, batch: dict, generator: torch.Generator, args: AlignArguments):
    """MSE (or pseudo-Huber) between the UNet's prediction and the noise (or v) target.

    pixel_values (B, 3, R, R) -> latents (B, 4, R/8, R/8); context (B, 480, 768) from the
    captions after caption dropout; timesteps uniform in [0, 1000).
    """
    latents = encode_images(parts.vae, batch["pixel_values"], generator)
    batch_size = latents.shape[0]
    keep = torch.rand(batch_size, generator=generator) >= args.caption_dropout
    captions = [caption if kept else "" for caption, kept in zip(batch["caption"], keep.tolist())]
    segments = batch.get("segments") or [None] * batch_size  # split in the DataLoader workers (None: here)
    segments = [given if kept else None for given, kept in zip(segments, keep.tolist())]  # "" is split here
    context = parts.encoder.context(parts.encoder.encode_frozen(captions, segments))  # adapter trains

    noise = randn_like(latents, generator)
    scheduler = parts.noise_scheduler
    timesteps = sample_timesteps(batch_size, generator, 0, scheduler.config.num_train_timesteps).to(latents.device)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    prediction = parts.unet(noisy_latents, timesteps, encoder_hidden_states=context.to(latents.dtype)).sample
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    loss = mse(prediction, target) if args.loss == "mse" else pseudo_huber(prediction, target, args.huber_c)
    return loss, {"caption_dropped": 1.0 - keep.float().mean().item()}


def build_stage(model_args: ModelArguments, args: AlignArguments, accelerator) -> Stage:
    """SD1.5 (+ `--init_from`) with a new LoRA `align`; the LoRA and (by default) the adapter train."""
    parts = load_stage_parts(
        model_args, args, accelerator, lora_name=STAGE, default_adapter=LAVI_BRIDGE_ADAPTER, train_adapter=args.train_adapter
    )
    check_prediction_type(parts.noise_scheduler.config.prediction_type)  # align_loss's target: eps or v
    trainable = {"unet": parts.unet}
    if args.train_adapter and parts.encoder.adapter is not None:
        parts.encoder.adapter.requires_grad_(True)
        trainable["encoder.adapter"] = parts.encoder.adapter
    loss_fn = functools.partial(align_loss, args=args)
    return Stage(STAGE, parts, trainable, loss_fn, ValidationSettings(sampler="unipc"))


@cli_entry
def main(argv: list[str] | None = None) -> None:
    model_args, args = parse_stage_arguments(AlignArguments, argv)
    check_output_dir(model_args, args, STAGE)  # a used --output_dir fails before any model loads
    dataset = build_train_dataset(args)  # a wrong --dataset or --image_root fails before any model loads
    accelerator = make_accelerator(args)
    run_training(model_args, args, accelerator, build_stage(model_args, args, accelerator), dataset)


if __name__ == "__main__":
    main()
