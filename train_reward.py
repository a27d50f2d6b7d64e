"""Stages `reward` and `reward_lcm`: decomposed preference optimisation (paper §4; METHOD.md §4-5).

A new UNet LoRA is trained on the align-fused UNet (`reward`, `--rollout ddim_cfg`) or the
align + lcm fused UNet (`reward_lcm`, `--rollout lcm`); the adapter is frozen. Each step
generates images from pure noise with a differentiable rollout, decodes the last x0 prediction
with the VAE and scores it with a CLIP-based preference model whose text embedding is split into
a text-relevant and a text-irrelevant part; the latter is weighted by w (default 0.3) to stop
the reward from overfitting to a generic "preferred" style.

    bash run_unet.sh reward NAME        # --init_from runs/align-NAME/final
    bash run_unet.sh reward_lcm NAME    # --init_from runs/align-NAME/final runs/lcm-NAME/final --rollout lcm
"""

from __future__ import annotations

import functools
import logging

import torch

from longalign.config import ModelArguments, RewardArguments
from longalign.data import CaptionDataset, load_caption_table
from longalign.diffusion import RolloutSettings, get_rollout
from longalign.loading import cli_entry
from longalign.pipeline import lacks_lcm_stage
from longalign.reward import DecomposedReward
from longalign.training import (
    DTYPES,
    Stage,
    StageParts,
    ValidationSettings,
    check_output_dir,
    encode_prompts_and_unconditional,
    load_stage_parts,
    make_accelerator,
    parse_stage_arguments,
    run_training,
)

logger = logging.getLogger(__name__)

STAGES = {"ddim_cfg": "reward", "lcm": "reward_lcm"}


def reward_loss(
    parts: StageParts, batch: dict, generator: torch.Generator, args: RewardArguments, reward: DecomposedReward,
    settings: RolloutSettings,
):  # fmt: skip
    """Roll out from noise, decode, score: loss = 0.5 (1 - mean x . (t - (1 - w) eta V)) (paper §4).

    captions (B) -> contexts (B, 480, 768) -> latents x0 (B, 4, R/8, R/8) -> images (B, 3, R, R) in [0, 1].
    """
    captions = batch["caption"]
    context, uncond = encode_prompts_and_unconditional(parts, captions, batch.get("segments"))
    vae = parts.vae
    latent_size = args.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    rollout = get_rollout(args.rollout)(
        parts.unet, context, uncond, parts.noise_scheduler,
        latent_shape=(vae.config.latent_channels, latent_size, latent_size),
        generator=generator, settings=settings,
    )
    images = vae.decode(rollout.x0.to(vae.dtype) / vae.config.scaling_factor).sample  # (B, 3, R, R) in ~[-1, 1]
    images = ((images.float() + 1) / 2).clamp(0, 1)
    return reward(images, captions, generator)


def build_stage(model_args: ModelArguments, args: RewardArguments, accelerator) -> Stage:
    """The fused UNet with a new LoRA (`reward` or `reward_lcm`, by `--rollout`) and the scorer."""
    name = STAGES[args.rollout]
    # the scorer first: a preference model that cannot be loaded fails before the diffusion models load
    reward = DecomposedReward(
        args, accelerator, device=accelerator.device, dtype=DTYPES[args.mixed_precision], segmenter=model_args.segmenter
    )
    parts = load_stage_parts(model_args, args, accelerator, lora_name=name)
    loss_fn = functools.partial(reward_loss, args=args, reward=reward, settings=args.rollout_settings())
    validation = ValidationSettings(sampler="unipc" if args.rollout == "ddim_cfg" else "lcm")
    return Stage(name, parts, {"unet": parts.unet}, loss_fn, validation, stateful={"common_direction": reward.direction})


@cli_entry
def main(argv: list[str] | None = None) -> None:
    model_args, args = parse_stage_arguments(RewardArguments, argv)
    check_output_dir(model_args, args, STAGES[args.rollout])  # a used --output_dir fails before any model loads
    if args.rollout == "lcm" and lacks_lcm_stage(model_args.init_from):
        logger.warning("--rollout lcm: none of the --init_from stages is an lcm stage; the 4-step rollout will be blurred")
    dataset = CaptionDataset(load_caption_table(args, with_images=False), args)
    accelerator = make_accelerator(args)
    run_training(model_args, args, accelerator, build_stage(model_args, args, accelerator), dataset)


if __name__ == "__main__":
    main()
