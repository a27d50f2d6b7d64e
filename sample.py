"""Generate images from long prompts with LongSD (or your own stage outputs).

    python sample.py --prompt "A 300-token paragraph ..."
    python sample.py --prompt_file prompts.txt --sampler lcm --init_from runs/align-x/final runs/lcm-x/final

With no --init_from/--adapter it uses the released LongSD weights (luping-liu/LongSD): adapter
s28750_adapter, align LoRA s28750_lora_vis.pt and reward LoRA sd15-reward-3750.pt, fused in order,
with the released `legacy` segmenter they were trained with unless --segmenter is given.
Every image is written as PNG with a JSON sidecar (prompt, seed, sampler, checkpoints, encoding report).
A rerun into the same --out skips the images already there with the same settings, so a cut-off
run of many prompts resumes; --batch_size N draws N images per call, each with its own seed.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from longalign.config import ModelArguments, parse_flags
from longalign.loading import UserError, check_device, check_folder_path, cli_entry, read_prompt_file
from longalign.pipeline import (
    LONGSD_ADAPTER,
    LONGSD_LORAS,
    LongPromptPipeline,
    get_sampler,
    lacks_lcm_stage,
    released_segmenter_warning,
    resolve_sources,
    source_digests,
    stack_warnings,
    validate_generation,
)

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
    out: str = field(default="outputs", metadata={"help": "output folder; a rerun skips the images it already holds"})
    overwrite: bool = field(default=False, metadata={"help": "regenerate this run's images where --out holds them made with other settings"})
    batch_size: int = field(default=1, metadata={"help": "images per pipeline call (each keeps its own seed)"})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ... (default: cuda if available)"})
    dtype: str | None = field(default=None, metadata={"help": "float32, float16 or bfloat16 (default: bfloat16 on a GPU that has it, as the stages train; else float16 on GPU, float32 on CPU)"})


def read_prompts(args: SampleArguments) -> list[str]:
    """The prompts to generate: --prompt, or the non-blank lines of --prompt_file."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise UserError("give exactly one of --prompt or --prompt_file")
    if args.prompt is not None:
        return [args.prompt]
    return read_prompt_file(args.prompt_file, "--prompt_file")


def given_flags(argv: list[str] | None) -> set[str]:
    """The `--flag` names on the command line (`--flag value` and `--flag=value`)."""
    return {arg.split("=", 1)[0] for arg in (sys.argv[1:] if argv is None else argv) if arg.startswith("--")}


def resolve_device(args: SampleArguments) -> tuple[str, torch.dtype]:
    """Device and dtype: CUDA when available, in bfloat16 (the stages' training precision,
    METHOD.md §5) where the card has it, else float16; the CPU in float32."""
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu_dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float16"
    dtype_name = args.dtype or (gpu_dtype if device.startswith("cuda") else "float32")
    if dtype_name not in DTYPES:
        raise UserError(f"unknown --dtype '{dtype_name}'; choose one of: {', '.join(DTYPES)}")
    return device, DTYPES[dtype_name]


@cli_entry
def main(argv: list[str] | None = None) -> None:
    model_args, args = parse_flags((ModelArguments, SampleArguments), argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    prompts = read_prompts(args)
    steps, guidance_scale = checked_generation(args)
    choose_weights(model_args, args.sampler, given_flags(argv))
    check_folder_path(args.out, "--out", writable=not os.path.isdir(args.out))  # a finished --out may be read-only
    for index, prompt in enumerate(prompts):
        if not prompt.strip() and (not prompt or model_args.segmenter != "legacy"):  # legacy: "  " is a "." segment
            print(f"prompt {index} is empty: unconditional generation")
    device, dtype = resolve_device(args)
    loras, adapter, checkpoints = resolve_sources(
        model_args.pretrained_model, model_args.t5_model, model_args.adapter, model_args.init_from, model_args.encoder_mode
    )
    digests = source_digests(loras, adapter)
    for warning in stack_warnings(model_args, loras, adapter, digests):
        logging.warning(warning)
    settings = {  # the same for every image; one JSON round trip, so it compares equal to a saved sidecar
        "negative_prompt": args.negative_prompt,
        "sampler": args.sampler,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "height": args.height,
        "width": args.width,
        "dtype": str(dtype).replace("torch.", ""),
        "checkpoints": canonical_sources(checkpoints),
        "weights_sha256": digests,  # a stage retrained at the same path is another checkpoint
        "encoder": {"mode": model_args.encoder_mode, "segmenter": model_args.segmenter, "token_length": model_args.token_length},
    }
    settings = json.loads(json.dumps(settings))
    todo = images_to_make(args, prompts, settings)
    if not todo:
        return  # before loading any model: a finished run is checked in seconds
    check_folder_path(args.out, "--out")
    os.makedirs(args.out, exist_ok=True)
    pipeline = LongPromptPipeline.from_pretrained(  # the sources resolved above: local paths, fetched once
        model_args.pretrained_model, model_args.t5_model, adapter, loras, model_args.encoder_mode,
        model_args.segmenter, model_args.token_length, device=device, dtype=dtype,
    )  # fmt: skip
    pipeline.set_sampler(args.sampler)
    generate(pipeline, todo, args, settings)
    print(f"wrote {len(todo)} image(s) to {args.out}", file=sys.stderr)


def checked_generation(args: SampleArguments) -> tuple[int, float]:
    """The step count and guidance scale (the sampler's unless given), after checking every
    numeric flag: a bad value is refused before any model loads."""
    spec = get_sampler(args.sampler)
    steps = spec.steps if args.steps is None else args.steps
    guidance_scale = spec.guidance_scale if args.guidance_scale is None else args.guidance_scale
    validate_generation(steps, args.height, args.width, spec.max_steps)
    if not math.isfinite(guidance_scale):
        raise UserError(f"--guidance_scale must be a finite number (got {guidance_scale})")
    if not -(2**63) <= args.seed <= 2**64 - args.num_images:  # torch.Generator seeds: int64 or uint64
        raise UserError(f"--seed must be in [-2**63, 2**64 - --num_images] (got {args.seed})")
    for flag, value in {"--num_images": args.num_images, "--batch_size": args.batch_size}.items():
        if value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    return steps, guidance_scale


def choose_weights(model_args: ModelArguments, sampler: str, flags: set[str]) -> None:
    """With no `--init_from`/`--adapter`, point `model_args` at the released LongSD weights (and
    their `legacy` segmenter unless `--segmenter` is in `flags`); say which weights are used and
    warn when the sampler needs an LCM stage the weights lack."""
    if not model_args.init_from and model_args.adapter is None:
        model_args.init_from, model_args.adapter = list(LONGSD_LORAS), LONGSD_ADAPTER
        if "--segmenter" not in flags:
            model_args.segmenter = "legacy"  # the split LongSD was trained with (METHOD.md §1: released by default)
        print(
            f"using the released LongSD weights: {LONGSD_ADAPTER}, {', '.join(LONGSD_LORAS)} "
            f"(--segmenter {model_args.segmenter})"
        )
        if sampler != "unipc":
            logging.warning("LongSD has no LCM LoRA: --sampler %s needs an lcm stage in --init_from for sharp images", sampler)
    elif not model_args.init_from:
        print(f"no --init_from: SD1.5 with the adapter {model_args.adapter} and no LoRA")
    elif sampler != "unipc" and lacks_lcm_stage(model_args.init_from):
        logging.warning("--sampler %s: none of the --init_from stages is an lcm stage, so the images will be blurred", sampler)
    mismatch = released_segmenter_warning(model_args)
    if mismatch:
        logging.warning(mismatch)


def images_to_make(args: SampleArguments, prompts: list[str], settings: dict) -> list[tuple[int, str, int]]:
    """(prompt index, prompt, k) for each image of this run that `--out` does not hold yet with
    these settings; says how many are skipped and how many other images the folder holds."""
    jobs = [(p, prompt, k) for p, prompt in enumerate(prompts) for k in range(args.num_images)]
    todo = [job for job in jobs if not already_made(args.out, *job, args.seed + job[2], settings, args.overwrite)]
    if len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} of {len(jobs)} image(s) already in {args.out} with these settings: skipped")
    this_run = {image_stem(args.out, p, k) + ".json" for p, _, k in jobs}
    others = [path for path in glob.glob(os.path.join(args.out, "[0-9]*_[0-9]*.json")) if path not in this_run]
    if others:
        print(f"note: {len(others)} other image(s) in {args.out} are not part of this run and are left as they are")
    return todo


def generate(pipeline: LongPromptPipeline, todo: list[tuple[int, str, int]], args: SampleArguments, settings: dict) -> None:
    """Draw the `todo` images `--batch_size` per pipeline call, image k with seed `--seed + k`,
    each written as PNG + sidecar as soon as its batch is done (so a cut-off run resumes)."""
    progress = tqdm(total=len(todo), desc="images", disable=len(todo) <= 1)
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start : start + args.batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(args.seed + k) for _, _, k in batch]
        images, reports = pipeline(
            [prompt for _, prompt, _ in batch], args.negative_prompt, settings["steps"], settings["guidance_scale"],
            args.height, args.width, generators, show_progress=len(todo) == 1,
        )  # fmt: skip
        for (prompt_index, prompt, k), image, report in zip(batch, images, reports):
            sidecar = {"prompt": prompt, "seed": args.seed + k, **settings, "encoding_report": report.to_dict()}
            write_image(image_stem(args.out, prompt_index, k), image, sidecar)
        progress.update(len(batch))
    progress.close()


def canonical_sources(checkpoints: dict) -> dict:
    """The sources of `resolve_sources`' record with each local path made absolute and resolved
    (`./runs/x/final/` and `runs/x/final`, or a run from another folder, are one checkpoint);
    hub ids as they are."""

    def canonical(source):
        if isinstance(source, str) and os.path.exists(os.path.expanduser(source)):
            return os.path.realpath(os.path.expanduser(source))
        return source

    return {key: [canonical(s) for s in value] if isinstance(value, list) else canonical(value) for key, value in checkpoints.items()}


def image_stem(out: str, prompt_index: int, k: int) -> str:
    """`OUT/NNNN_KK`: image k of prompt N, without the extension."""
    return os.path.join(out, f"{prompt_index:04d}_{k:02d}")


def already_made(out: str, prompt_index: int, prompt: str, k: int, seed: int, settings: dict, overwrite: bool) -> bool:
    """True when `OUT/NNNN_KK.png` and its sidecar exist for this prompt, seed and these (JSON) settings.

    A sidecar from other settings (another sampler, step count, checkpoint, ...) is refused with
    the first difference named, so a rerun never mixes two settings in one folder, unless
    `overwrite`. The sidecar is written after the PNG, so an image cut off mid-write is redone.
    """
    stem = image_stem(out, prompt_index, k)
    try:
        with open(stem + ".json", encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError):
        return False
    wanted = {"prompt": prompt, "seed": seed, **settings}
    if isinstance(saved.get("checkpoints"), dict):  # written as typed by an older sample.py
        saved["checkpoints"] = canonical_sources(saved["checkpoints"])
    differs = [key for key, value in wanted.items() if saved.get(key) != value]
    if differs and not overwrite:
        key = differs[0]
        made = f"records no {key} (an older sample.py wrote it)" if key not in saved else f"was made with {key} {saved[key]!r}"
        raise UserError(f"'{stem}.json' {made}, this run has {wanted[key]!r}; pass another --out, or --overwrite to regenerate")
    return not differs and os.path.exists(stem + ".png")


def write_image(stem: str, image, sidecar: dict) -> None:
    """Write `stem.png`, then `stem.json` (which marks it complete), each through a rename.

    An older sidecar goes first: cut off between the two writes, a regenerated (`--overwrite`)
    image must not be left beside the sidecar of the image it replaced.
    """
    if os.path.exists(stem + ".json"):
        os.remove(stem + ".json")
    image.save(stem + ".png.tmp", format="PNG")
    os.replace(stem + ".png.tmp", stem + ".png")
    with open(stem + ".json.tmp", "w", encoding="utf-8") as handle:
        json.dump(sidecar, handle, indent=2, ensure_ascii=False)
    os.replace(stem + ".json.tmp", stem + ".json")


if __name__ == "__main__":
    main()
