"""Long-prompt generation on a stock diffusers `StableDiffusionPipeline` (METHOD.md §5, sampling).

The long-prompt context from `LongPromptEncoder` goes in through `prompt_embeds` /
`negative_prompt_embeds`, so everything else — schedulers, CFG, VAE decoding, LoRA loading — is
diffusers' own. This is the one generation path: `sample.py` and training validation use it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel, UniPCMultistepScheduler

from .loading import UserError, content_digest, load_pretrained, local_path
from .lora import LEGACY_SUFFIXES, LORA_WEIGHT_NAME
from .text_encoding import SD15, T5_LARGE, LongPromptEncoder, PromptReport

if TYPE_CHECKING:
    from .config import ModelArguments

LONGSD = "luping-liu/LongSD"
LONGSD_ADAPTER = f"{LONGSD}/s28750_adapter"
LONGSD_LORAS = (f"{LONGSD}/s28750_lora_vis.pt", f"{LONGSD}/sd15-reward-3750.pt")
LAVI_BRIDGE_ADAPTER = "shihaozhao/LaVi-Bridge/t5_unet/adapter"  # the align stage's initial adapter (METHOD.md §2)


class ReleasedLCMScheduler(LCMScheduler):
    """LCMScheduler whose boundary scalings are forced to (c_skip, c_out) = (0, 1).

    The released LongSD LCM sampler does this: each step's denoised sample is the model's x0
    prediction itself. Everything else (timesteps, re-noising) is diffusers' LCMScheduler.
    """

    def get_scalings_for_boundary_condition_discrete(self, timestep):
        return 0.0, 1.0


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler and its defaults: scheduler class, steps, guidance scale, and the most steps it takes
    (LCM: its `original_inference_steps` grid of 50; UniPC: below SD1.5's 1000 training timesteps)."""

    scheduler: type
    steps: int
    guidance_scale: float
    max_steps: int


SAMPLERS: dict[str, SamplerSpec] = {
    "unipc": SamplerSpec(UniPCMultistepScheduler, 25, 7.5, 500),  # (diffusers' UniPC gives NaN images at 999)
    "lcm": SamplerSpec(ReleasedLCMScheduler, 4, 0.0, 50),
    "lcm_standard": SamplerSpec(LCMScheduler, 4, 0.0, 50),
}


def get_sampler(name: str) -> SamplerSpec:
    """Look up a sampler; unknown names raise a `UserError` listing the choices."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def validate_generation(steps: int, height: int, width: int, max_steps: int | None = None) -> None:
    """Refuse settings diffusers would fail on deep inside: no steps (or more than the sampler's
    `max_steps`), sizes not multiples of 8."""
    if steps < 1:
        raise UserError(f"--steps must be at least 1 (got {steps})")
    if max_steps is not None and steps > max_steps:
        raise UserError(f"--steps {steps}: this sampler takes at most {max_steps}")
    if height % 8 or width % 8 or min(height, width) < 8:
        raise UserError(f"--height and --width must be positive multiples of 8 (got {height}x{width})")


def resolve_sources(
    pretrained_model: str, t5_model: str, adapter: str | None, init_from: Sequence[str], mode: str
) -> tuple[list[str], str | None, dict]:
    """Before anything loads: the local LoRA paths of `init_from`, the adapter folder (None in
    `clip` mode) and the record of what a pipeline from them is made of (sidecars, model cards)."""
    loras = [local_path(source, "LoRA") for source in init_from]
    if mode != "clip":
        adapter = local_path(stage_adapter(adapter, loras), "adapter")
    checkpoints = {"pretrained_model": pretrained_model, "t5_model": t5_model, "adapter": adapter, "init_from": list(init_from)}
    return loras, adapter, checkpoints


def weights_digest(source: str) -> str:
    """`content_digest` of the weights a local `--init_from` source brings: the file itself, or a
    stage folder's LoRA file and `adapter/*.safetensors`, not its `config.json`, model card or the
    adapter's config (a run resumed at its last step rewrites those, and no weight)."""
    if not os.path.isdir(source):
        return content_digest(source)
    parts = [os.path.join(source, LORA_WEIGHT_NAME)] + sorted(glob.glob(os.path.join(source, "adapter", "*.safetensors")))
    return hashlib.sha256(" ".join(content_digest(part) for part in parts if os.path.isfile(part)).encode()).hexdigest()[:16]


def source_digests(loras: Sequence[str], adapter: str | None) -> dict:
    """`weights_digest` of each local `--init_from` source and `content_digest` of the adapter folder
    (None without one), recorded as `weights_sha256` in sample.py's sidecars and in each stage's
    `config.json`, so a stage retrained or trained further at the same path is told apart from the
    one that was used."""
    return {"adapter": content_digest(adapter) if adapter else None, "init_from": [weights_digest(lora) for lora in loras]}


def stage_config(source: str) -> dict | None:
    """The `config.json` of one of our stage folders (`runs/align-x/final`), or None for anything
    else (a LoRA file, a released `.pt`, a hub path)."""
    try:
        with open(os.path.join(source, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "stage" in config else None


def lacks_lcm_stage(init_from: Sequence[str]) -> bool:
    """True when every `--init_from` source is one of our stage folders and none is an `lcm` stage:
    LCM sampling (or the reward_lcm rollout) of that UNet gives blurred images. A source of
    unknown kind may be an LCM-LoRA, so then False."""
    configs = [stage_config(source) for source in init_from]
    return all(configs) and not any(config["stage"] == "lcm" for config in configs)


def released_segmenter_warning(model_args: ModelArguments) -> str | None:
    """A warning when the released LongSD weights meet a segmenter other than `legacy`, the split
    they were trained with (METHOD.md §1), else None. Released means a `luping-liu/LongSD/...`
    source or a legacy `.pt`/`.pth` LoRA file, a format only the release writes. Checked on the
    sources as named, so it comes before any download."""
    named = [model_args.adapter or "", *model_args.init_from]
    released = [source for source in named if source.startswith(f"{LONGSD}/") or source.lower().endswith(LEGACY_SUFFIXES)]
    if not released or model_args.segmenter == "legacy" or model_args.encoder_mode == "t5":  # t5: no segments
        return None
    return (
        f"{released[0]} was trained on prompts split by --segmenter legacy; "
        f"this run splits them by --segmenter {model_args.segmenter}"
    )


def stack_warnings(model_args: ModelArguments, loras: Sequence[str], adapter: str | None, digests: dict) -> list[str]:
    """What a stack of `--init_from` stages (`loras`: their local paths, `digests`: their
    `source_digests`) and the `adapter` have that the stages were not trained with, from each stage
    folder's `config.json`: other encoder settings or models (the LoRA then sees a context it was
    not trained on), fewer stages before one than it was trained on top of, stages before it that
    have changed since it was trained on them (retrained or trained further at the same path), and
    an explicit `--adapter` other than (by content) the one the last stage folder carries."""
    found = []
    for index, source in enumerate(loras):
        config = stage_config(source) or {}  # {}: not a stage folder of ours
        trained = config.get("model") or {}
        found += [f"{source} was trained with {difference}" for difference in model_args.encoding_differences(trained)]
        below = list(trained.get("init_from") or [])
        if len(below) > index:
            found.append(
                f"{source} was trained on top of {', '.join(map(str, below))}, but --init_from puts {index} stage(s) before it"
            )
            continue
        then = (config.get("weights_sha256") or {}).get("init_from") or []  # absent: written before it was recorded
        missing = [f"{path} (sha256 {digest})" for path, digest in zip(below, then) if digest not in digests["init_from"][:index]]
        if missing:  # by content, wherever it sits in the stack
            found.append(
                f"{source} was trained on top of {', '.join(missing)}, which no stage before it holds: changed since, or left out"
            )
    carried = [os.path.join(source, "adapter") for source in loras if os.path.isdir(os.path.join(source, "adapter"))]
    if model_args.adapter is not None and adapter and carried and content_digest(adapter) != content_digest(carried[-1]):
        found.append(f"--adapter {model_args.adapter} replaces {carried[-1]}, the adapter that stage was trained with")
    return found


def stage_adapter(adapter: str | None, init_from: Sequence[str]) -> str:
    """The adapter to use: `adapter` if given, else the `adapter/` of the last stage folder that has one.

    Stage outputs (`runs/align-x/final`) carry the adapter the align stage trained, so naming
    them is enough; anything else must name `--adapter` explicitly (never a silent fallback).
    """
    if adapter is not None:
        return adapter
    for source in reversed(list(init_from)):
        if os.path.isdir(os.path.join(source, "adapter")):
            return os.path.join(source, "adapter")
    raise UserError(
        "no adapter: none of the --init_from folders has an adapter/ folder; pass --adapter "
        f"(e.g. {LONGSD_ADAPTER} or runs/align-NAME/final/adapter)"
    )


class LongPromptPipeline:
    """A `StableDiffusionPipeline` driven by long-prompt contexts.

    `__call__(prompts, ...)` encodes prompts (B) and the negative prompt with the
    `LongPromptEncoder` into (B, L, D) contexts and runs the diffusers pipeline on them.
    """

    def __init__(self, pipe: StableDiffusionPipeline, encoder: LongPromptEncoder):
        self.pipe = pipe
        self.encoder = encoder

    @classmethod
    def from_components(cls, vae, unet, scheduler, encoder: LongPromptEncoder) -> "LongPromptPipeline":
        """Wrap in-memory parts (e.g. the UNet being trained) without copying them."""
        clip = encoder.clip
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=clip.text_encoder if clip is not None else None,
            tokenizer=clip.tokenizer if clip is not None else None,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        return cls(pipe, encoder)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model: str = SD15,
        t5_model: str = T5_LARGE,
        adapter: str | None = None,
        init_from: Sequence[str] = (),
        mode: str = "clip+t5",
        segmenter: str = "sentences",
        token_length: int = 240,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "LongPromptPipeline":
        """SD1.5 + T5 + adapter, with the stage LoRAs in `init_from` fused into the UNet in order (in
        float32, then cast to `dtype`).

        Every source is a hub id/path or a local folder/file; released `.pt` LoRAs are converted.
        """
        from .lora import fuse_stage_loras

        loras, adapter, _ = resolve_sources(pretrained_model, t5_model, adapter, init_from, mode)
        encoder = LongPromptEncoder.from_pretrained(
            pretrained_model, t5_model, adapter, mode, token_length, segmenter, device=device, dtype=dtype
        )
        shared = {"text_encoder": encoder.clip.text_encoder, "tokenizer": encoder.clip.tokenizer} if encoder.clip else {}
        # UNet and VAE through load_pretrained too, which refuses a folder that lacks their weights. The
        # LoRAs are fused in float32 and the sum cast once, as the stages fuse earlier ones before training.
        unet = load_pretrained(UNet2DConditionModel, pretrained_model, "UNet", subfolder="unet")
        fuse_stage_loras(unet, loras)
        shared["unet"] = unet.to(dtype)
        shared["vae"] = load_pretrained(AutoencoderKL, pretrained_model, "VAE", subfolder="vae", dtype=dtype)
        pipe = load_pretrained(
            StableDiffusionPipeline,
            pretrained_model,
            "Stable Diffusion pipeline",
            dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
            **shared,
        )
        pipe.to(device)
        return cls(pipe, encoder)

    def set_sampler(self, name: str) -> SamplerSpec:
        """Switch the pipeline's scheduler to sampler `name` (same noise schedule)."""
        spec = get_sampler(name)
        self.pipe.scheduler = spec.scheduler.from_config(self.pipe.scheduler.config)
        return spec

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[PromptReport]]:
        """Prompts -> (context (B, L, D) in the UNet's dtype, reports)."""
        context, reports = self.encoder(list(prompts))
        return context.to(self.pipe.unet.dtype), reports

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        negative_prompt: str = "",
        steps: int = 25,
        guidance_scale: float = 7.5,
        height: int = 512,
        width: int = 512,
        generator: torch.Generator | list[torch.Generator] | None = None,
        show_progress: bool = True,
    ) -> tuple[list, list[PromptReport]]:
        """Generate one image per prompt. Returns (PIL images, encoding reports)."""
        validate_generation(steps, height, width)
        context, reports = self.encode(prompts)
        negative = None
        if guidance_scale > 1:
            negative, _ = self.encode([negative_prompt])
            negative = negative.expand(len(prompts), -1, -1)
        self.pipe.set_progress_bar_config(disable=not show_progress, leave=False)
        images = self.pipe(
            prompt_embeds=context,
            negative_prompt_embeds=negative,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=generator,
        ).images
        return images, reports
