"""Generate images from long prompts with LongSD (or your own stage outputs).

    python sample.py --prompt "A 300-token paragraph ..."
    python sample.py --prompt_file prompts.txt --sampler lcm --init_from runs/align-x/final runs/lcm-x/final

With no --init_from/--adapter it uses the released LongSD weights (luping-liu/LongSD): adapter
s28750_adapter, align LoRA s28750_lora_vis.pt and reward LoRA sd15-reward-3750.pt, fused in order.
Every image is written as PNG with a JSON sidecar (prompt, seed, sampler, checkpoints, encoding report).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from longalign.config import ModelArguments
from longalign.loading import UserError, cli_entry
from longalign.pipeline import LONGSD_ADAPTER, LONGSD_LORAS, LongPromptPipeline, get_sampler, validate_generation

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SampleArguments:
    """What to generate and how."""

    prompt: str | None = field(default=None, metadata={"help": "the prompt (any length; empty = unconditional)"})
    prompt_file: str | None = field(default=None, metadata={"help": "a text file with one prompt per line"})
    negative_prompt: str = field(default="", metadata={"help": "negative prompt for classifier-free guidance"})
    sampler: str = field(default="unipc", metadata={"help": "unipc (25 steps, CFG 7.5), lcm (4 steps, guidance 0, released) or lcm_standard"})
    steps: int | None = field(default=None, metadata={"help": "denoising steps (default: the sampler's)"})
    guidance_scale: float | None = field(default=None, metadata={"help": "CFG scale (default: the sampler's)"})
    seed: int = field(default=0, metadata={"help": "image k of a prompt uses seed + k"})
    num_images: int = field(default=1, metadata={"help": "images per prompt"})
    height: int = field(default=512, metadata={"help": "image height (multiple of 8)"})
    width: int = field(default=512, metadata={"help": "image width (multiple of 8)"})
    out: str = field(default="outputs", metadata={"help": "output folder"})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ... (default: cuda if available)"})
    dtype: str | None = field(default=None, metadata={"help": "float32, float16 or bfloat16 (default: float16 on GPU, float32 on CPU)"})


def read_prompts(args: SampleArguments) -> list[str]:
    """The prompts to generate: --prompt, or the non-blank lines of --prompt_file."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise UserError("give exactly one of --prompt or --prompt_file")
    if args.prompt is not None:
        return [args.prompt]
    try:
        with open(args.prompt_file, encoding="utf-8") as handle:
            prompts = [line.strip() for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read --prompt_file '{args.prompt_file}': {error.__class__.__name__}: {error}") from None
    if not prompts:
        raise UserError(f"--prompt_file '{args.prompt_file}' holds no prompts")
    return prompts


def resolve_device(args: SampleArguments) -> tuple[str, torch.dtype]:
    """Device and dtype: CUDA in float16 when available, else CPU in float32."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    dtype_name = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    if dtype_name not in DTYPES:
        raise UserError(f"unknown --dtype '{dtype_name}'; choose one of: {', '.join(DTYPES)}")
    return device, DTYPES[dtype_name]


@cli_entry
def main(argv: list[str] | None = None) -> None:
    model_args, args = HfArgumentParser((ModelArguments, SampleArguments)).parse_args_into_dataclasses(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    prompts = read_prompts(args)
    spec = get_sampler(args.sampler)
    steps = spec.steps if args.steps is None else args.steps
    guidance_scale = spec.guidance_scale if args.guidance_scale is None else args.guidance_scale
    validate_generation(steps, args.height, args.width)
    if args.num_images < 1:
        raise UserError(f"--num_images must be at least 1 (got {args.num_images})")
    if not model_args.init_from and model_args.adapter is None:
        model_args.init_from, model_args.adapter = list(LONGSD_LORAS), LONGSD_ADAPTER
        print(f"using the released LongSD weights: {LONGSD_ADAPTER}, {', '.join(LONGSD_LORAS)}")
    for index, prompt in enumerate(prompts):
        if not prompt.strip():
            print(f"prompt {index} is empty: unconditional generation")
    device, dtype = resolve_device(args)

    pipeline = LongPromptPipeline.from_pretrained(
        model_args.pretrained_model,
        model_args.t5_model,
        model_args.adapter,
        model_args.init_from,
        model_args.encoder_mode,
        model_args.segmenter,
        model_args.token_length,
        device=device,
        dtype=dtype,
    )
    pipeline.set_sampler(args.sampler)
    os.makedirs(args.out, exist_ok=True)
    jobs = [(p, prompt, k) for p, prompt in enumerate(prompts) for k in range(args.num_images)]
    for prompt_index, prompt, k in tqdm(jobs, desc="images", disable=len(jobs) == 1):
        seed = args.seed + k
        generator = torch.Generator(device="cpu").manual_seed(seed)
        (image,), (report,) = pipeline(
            [prompt], args.negative_prompt, steps, guidance_scale, args.height, args.width, generator
        )
        stem = os.path.join(args.out, f"{prompt_index:04d}_{k:02d}")
        image.save(stem + ".png")
        sidecar = {
            "prompt": prompt,
            "negative_prompt": args.negative_prompt,
            "seed": seed,
            "sampler": args.sampler,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "height": args.height,
            "width": args.width,
            "dtype": str(dtype).replace("torch.", ""),
            "checkpoints": pipeline.checkpoints,
            "encoder": {"mode": model_args.encoder_mode, "segmenter": model_args.segmenter, "token_length": model_args.token_length},
            "encoding_report": report.to_dict(),
        }
        with open(stem + ".json", "w", encoding="utf-8") as handle:
            json.dump(sidecar, handle, indent=2, ensure_ascii=False)
    print(f"wrote {len(jobs)} image(s) to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
