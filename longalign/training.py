"""The one training loop every stage shares (DESIGN.md; METHOD.md §5 "Common").

A stage script loads its parts with `load_stage_parts`, says which modules train and defines its
loss; `run_training` does the rest: accelerator and mixed precision (frozen weights in bf16/fp16,
trainable ones in fp32), AdamW with constant-after-warmup LR, gradient accumulation and clipping,
a rank-sharded resumable data order, checkpoints that a crash mid-save cannot corrupt, exact
resume, non-finite loss handling, logging, validation images and the `final/` outputs.

Randomness: every micro-step draws from a generator seeded by (seed, micro-step, rank), and the
global torch RNG (LoRA dropout) is re-seeded the same way, so a resumed run repeats exactly what
an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .config import ModelArguments, TrainingArguments, parse_flags, same_setting
from .data import STOP_SIGNALS, BadRowMonitor, ResumableSampler, closing_workers, make_dataloader
from .loading import UserError, check_folder_path, content_digest, error_line, is_hub_id, load_pretrained, local_path
from .lora import LoraSettings, add_lora, fuse_stage_loras, save_lora
from .pipeline import (
    LongPromptPipeline,
    get_sampler,
    released_segmenter_warning,
    resolve_sources,
    source_digests,
    stack_warnings,
    stage_config,
    weights_digest,
)
from .text_encoding import LongPromptEncoder

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
TRUNCATION_WARNINGS = 5  # cut captions a training log names (main process only); the rest are not shown


# ----------------------------------------------------------------------------- arguments
def parse_stage_arguments(stage_class: type, argv: list[str] | None = None) -> tuple[ModelArguments, Any]:
    """Parse `--flags` into (ModelArguments, the stage's TrainingArguments subclass)."""
    model_args, args = parse_flags((ModelArguments, stage_class), argv)
    return model_args, args


def make_accelerator(args: TrainingArguments) -> Accelerator:
    """Accelerator with the run's precision, accumulation and trackers (logs in OUTPUT_DIR/logs).

    Launched as several processes on a machine without a GPU, they train together on the CPU
    (accelerate would otherwise run each alone, as that many separate runs in one folder)."""
    config = ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=config,
        cpu=args.cpu or (launched > 1 and not torch.cuda.is_available()),
        step_scheduler_with_optimizer=False,  # the loop steps it once per optimizer step (warmup in optimizer steps)
    )
    if accelerator.num_processes != launched:
        raise UserError(
            f"launched as {launched} processes, but accelerate runs {accelerator.num_processes}: check NUM_GPUS "
            "and the accelerate config (--cpu trains the processes together on the CPU)"
        )
    # This project's INFO lines (adapter used, resume, rank agreement) from the main process; warnings
    # from every process. A no-op where logging is configured already (e.g. under pytest).
    logging.basicConfig(format="%(levelname)s:%(name)s: %(message)s")
    logging.getLogger("longalign").setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    return accelerator


# --------------------------------------------------------------------------------- parts
@dataclass
class StageParts:
    """The models a stage works with. Trainable ones are swapped for their prepared wrappers."""

    unet: nn.Module
    vae: AutoencoderKL
    encoder: LongPromptEncoder
    noise_scheduler: DDPMScheduler
    weight_dtype: torch.dtype
    adapter_source: str | None = None  # the local adapter folder the encoder loaded (None in clip mode)
    weights_sha256: dict | None = None  # `source_digests` of that adapter and the --init_from stages


LossFn = Callable[[StageParts, dict, torch.Generator], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class ValidationSettings:
    """How a stage's validation images are drawn: sampler, steps and guidance (paper's sampling)."""

    sampler: str = "unipc"
    steps: int | None = None
    guidance_scale: float | None = None


@dataclass
class Stage:
    """What a stage script defines: its name (also its LoRA's), parts, what trains, its loss.

    `trainable` maps attribute paths of `parts` (`unet`, `encoder.adapter`) to modules;
    `loss_fn(parts, batch, generator) -> (loss, logs)`, where `batch` is `collate_examples`' dict
    plus `global_step`, the optimizer steps made before this micro-step's (the same across an
    accumulation window and after a resume: what a weight schedule or curriculum should read),
    and `logs` are floats averaged over the window and logged beside `loss`; `stateful` objects
    with `state_dict`/`load_state_dict` (e.g. an EMA common direction) are checkpointed as JSON.
    """

    name: str
    parts: StageParts
    trainable: dict[str, nn.Module]
    loss_fn: LossFn
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    stateful: dict[str, Any] = field(default_factory=dict)


def load_stage_parts(
    model_args: ModelArguments,
    args: TrainingArguments,
    accelerator: Accelerator,
    lora_name: str,
    default_adapter: str | None = None,
    train_adapter: bool = False,
) -> StageParts:
    """SD1.5 parts with the earlier stages' LoRAs (`--init_from`) fused, and a new LoRA `lora_name`.

    Frozen weights are cast to the mixed-precision dtype; the new LoRA, and the adapter when
    `train_adapter`, are fp32. The adapter comes from `--adapter`, else the `adapter/` of the last
    `--init_from` stage folder, else (no `--init_from`) `default_adapter` (align: LaVi-Bridge's
    `t5_unet/adapter`, as released).
    """
    weight_dtype = DTYPES[args.mixed_precision]
    device = accelerator.device
    mismatch = released_segmenter_warning(model_args)
    if mismatch:
        logger.warning(mismatch)
    preferred = model_args.adapter or (default_adapter if not model_args.init_from else None)
    init_from, adapter, _ = resolve_sources(
        model_args.pretrained_model, model_args.t5_model, preferred, model_args.init_from, model_args.encoder_mode
    )
    if adapter is not None:
        logger.info("text adapter: %s", adapter)
    digests = source_digests(init_from, adapter)
    for warning in stack_warnings(model_args, init_from, adapter, digests):
        logger.warning(warning)
    unet = load_pretrained(UNet2DConditionModel, model_args.pretrained_model, "UNet", subfolder="unet")
    fuse_stage_loras(unet, init_from)
    vae = load_pretrained(AutoencoderKL, model_args.pretrained_model, "VAE", subfolder="vae")
    noise_scheduler = load_pretrained(DDPMScheduler, model_args.pretrained_model, "noise scheduler", subfolder="scheduler")
    # on the device once, as diffusers' own add_noise leaves it (the solvers index it every step)
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    encoder = LongPromptEncoder.from_pretrained(
        model_args.pretrained_model,
        model_args.t5_model,
        adapter,
        model_args.encoder_mode,
        model_args.token_length,
        model_args.segmenter,
        device=device,
        dtype=weight_dtype,
        adapter_dtype=torch.float32 if train_adapter else None,
    )
    encoder.limit_truncation_warnings(TRUNCATION_WARNINGS if accelerator.is_main_process else 0)
    for module in (unet, vae, encoder):
        module.requires_grad_(False)
    unet.to(device, weight_dtype)
    vae.to(device, weight_dtype)
    set_seed(args.seed)  # the new LoRA's initialisation
    add_lora(unet, lora_name, LoraSettings(rank=args.lora_rank, dropout=args.lora_dropout))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return StageParts(unet, vae, encoder, noise_scheduler, weight_dtype, adapter_source=adapter, weights_sha256=digests)


def encode_images(vae: AutoencoderKL, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8), sampled with `generator`."""
    with torch.no_grad():
        distribution = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
        latents = distribution.mean + distribution.std * randn_like(distribution.mean, generator)
    return latents * vae.config.scaling_factor


@torch.no_grad()
def encode_prompts_and_unconditional(
    parts: StageParts, prompts: list[str], segments: list[list[str] | None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen contexts for prompts (B, L, D) and for "" broadcast to (B, L, D), in the weight dtype (CFG).
    `segments`: the prompts' CLIP segments when the DataLoader split them (a batch's `segments`)."""
    context, _ = parts.encoder(prompts, segments)
    uncond, _ = parts.encoder([""])
    return context.to(parts.weight_dtype), uncond.to(parts.weight_dtype).expand(len(prompts), -1, -1)


def randn_like(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like `tensor`, drawn on the generator's device then moved."""
    noise = torch.randn(tensor.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(tensor.device, tensor.dtype)


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_dirs(output_dir: str) -> list[Path]:
    """Complete checkpoints (`checkpoints/step_N` holding the state file), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if checkpoint_step(d) is not None and (d / STATE_FILE).exists()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int | None:
    """The optimizer step in a checkpoint folder's name (`step_N`), or None for another name."""
    digits = path.name.removeprefix("step_")
    return int(digits) if path.name.startswith("step_") and digits.isdigit() else None


def saved_state(checkpoint: Path) -> dict[str, Any] | None:
    """A checkpoint's `training_state.json` (None when it is damaged: `load_checkpoint` names it)."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def holds_run(out: Path) -> bool:
    """Whether an output folder holds (part of) a training run."""
    return any((out / name).exists() for name in ("config.json", "checkpoints", "final"))


def check_output_dir(model_args: ModelArguments, args: TrainingArguments, stage: str) -> Path | None:
    """The checkpoint this run of `stage` resumes (None: it starts fresh), or a `UserError` for an
    output folder it must not use or a checkpoint it must not resume so (one of another stage among
    them). It only reads, so the stage scripts call it before any model loads."""
    return _checked_resume(model_args, args, stage)[0]


def _checked_resume(model_args: ModelArguments, args: TrainingArguments, stage: str) -> tuple[Path | None, list[str]]:
    """`check_output_dir`'s checkpoint and the flags the resume changes, so that `prepare_output_dir`
    names them without comparing (and hashing the earlier stages' weights) a second time."""
    out = Path(args.output_dir)
    check_folder_path(str(out), "--output_dir")
    if args.resume_from is None:
        if holds_run(out) and not args.overwrite:
            if not checkpoint_dirs(args.output_dir):
                raise UserError(f"'{out}' holds a run that saved no checkpoint; pass --overwrite to start it over")
            raise UserError(
                f"'{out}' holds another run; pass --resume_from latest to continue it or --overwrite to replace it"
            )
        return None, []
    if args.resume_from in ("latest", "auto"):
        found = checkpoint_dirs(args.output_dir)
        if not found and args.resume_from == "auto":
            return None, []
        if not found:
            raise UserError(
                f"--resume_from latest: no checkpoint in '{out / 'checkpoints'}'; use --resume_from auto to start "
                "fresh when there is none"
            )
        path = found[-1]
    else:
        path = Path(args.resume_from)
        if not (path / STATE_FILE).exists():
            raise UserError(f"--resume_from '{path}' is not a complete checkpoint (no {STATE_FILE})")
        if holds_run(out) and path.resolve().parent != (out / "checkpoints").resolve():
            raise UserError(
                f"'{out}' holds another run than the one '{path}' belongs to; continue it in an empty --output_dir"
            )
    recorded = checkpoint_config(path) or {}
    saved_stage = recorded.get("stage")
    if saved_stage is not None and saved_stage != stage:
        raise UserError(f"'{path}' is a checkpoint of the {saved_stage} stage; this run trains {stage}")
    check_training_length(path, args, recorded.get("training", {}))
    check_optimizer_settings(path, args)
    differences = resumed_differences(path, model_args, args)
    if differences["refused"]:
        raise UserError(
            f"'{path}' was trained with {differences['refused'][0]}; resume with the same settings, or start the run "
            "anew with --overwrite"
        )
    return path, differences["changed"]


def check_training_length(checkpoint: Path, args: TrainingArguments, recorded: dict) -> None:
    """A `UserError` when the run would end before the checkpoint: `final/` would hold its later
    state while `config.json` recorded the shorter run.

    A run of `--num_train_epochs N` stops at the first window's end at or past N epochs, so its
    last checkpoint may hold more than N (1.33 of 1, say): resuming it with the same stopping rule
    (a crash after the last save, a requeued `--resume_from auto` job) finishes it, not refused.
    `recorded`: the training flags of the checkpoint's `config.json`."""
    state = saved_state(checkpoint) or {}
    step = state.get("global_step")
    if args.max_train_steps is not None:
        if isinstance(step, int) and step > args.max_train_steps:
            raise UserError(f"--max_train_steps {args.max_train_steps} is below the step of '{checkpoint}' ({step})")
        return
    try:
        done = ResumableSampler.from_state(state["sampler"]).epochs_consumed
    except (KeyError, TypeError, ValueError, UserError):
        return  # damaged: load_checkpoint names it
    same_rule = recorded.get("max_train_steps") is None and recorded.get("num_train_epochs") == args.num_train_epochs
    if done > args.num_train_epochs and not same_rule:
        raise UserError(
            f"--num_train_epochs {args.num_train_epochs} is below the {done:.2f} epochs of '{checkpoint}' "
            f"(--max_train_steps {step} ends the run at it)"
        )


def check_optimizer_settings(checkpoint: Path, args: TrainingArguments) -> None:
    """A `UserError` when this run's AdamW flags differ from the checkpoint's: resuming restores the
    optimizer's settings with its moments, so a changed `--learning_rate` (or beta, weight decay,
    epsilon) would be silently ignored while `config.json` recorded it."""
    try:
        with safe_open(checkpoint / OPTIMIZER_FILE, framework="pt") as file:
            group = json.loads(file.metadata()["param_groups"])[0]
        saved = {
            "--learning_rate": group.get("initial_lr", group["lr"]),
            "--adam_beta1": group["betas"][0],
            "--adam_beta2": group["betas"][1],
            "--adam_weight_decay": group["weight_decay"],
            "--adam_epsilon": group["eps"],
        }
    except (OSError, KeyError, ValueError, TypeError, IndexError, SafetensorError):
        return  # an incomplete or damaged checkpoint: load_checkpoint names what is wrong
    ours = (args.learning_rate, args.adam_beta1, args.adam_beta2, args.adam_weight_decay, args.adam_epsilon)
    for (flag, value), own in zip(saved.items(), ours):
        if not math.isclose(value, own, rel_tol=1e-9):
            raise UserError(
                f"{flag} {own:g} differs from the checkpoint's {value:g}: a resumed run keeps its optimizer "
                f"settings; resume with {flag} {value:g} or start a new run"
            )


# Training flags that may change on a resume without a word (where and how long the run goes, what
# it logs, memory), and those that must not (the data order, which rows, and what trains). Any
# other change, e.g. the batch size or accumulation (the global batch from here on) or the
# --dataset and --image_root (data that moved, or other data with as many rows), is named in a
# warning.
RESUMABLE_FLAGS = frozenset({
    "output_dir", "resume_from", "overwrite", "max_train_steps", "num_train_epochs", "checkpointing_steps",
    "checkpoints_total_limit", "validation_steps", "validation_prompts", "report_to", "dataloader_num_workers",
    "cpu", "max_nonfinite_steps", "max_bad_fraction", "min_rows_before_check", "warn_every_rows",
    "cache_dir", "gradient_checkpointing",
})  # fmt: skip
FIXED_FLAGS = frozenset({"seed", "split", "max_rows", "lora_rank", "train_adapter", "rollout"})


def checkpoint_config(checkpoint: Path) -> dict | None:
    """The `config.json` a checkpoint was saved with (its own, else its run's), or None when it does not read."""
    return stage_config(str(checkpoint if (checkpoint / "config.json").exists() else checkpoint.parent.parent))


def _moved(recorded: str, now: str) -> bool:
    """Whether a model recorded at `recorded` may be the one at `now`: nothing is at `recorded` any
    more and it was a local path (a moved folder), or it is a hub id and `now` a local folder (the
    hub id since downloaded). Two hub ids, or two existing folders, are other models."""
    if os.path.exists(os.path.expanduser(recorded)):
        return False
    return not is_hub_id(recorded) or os.path.exists(os.path.expanduser(now))


def resumed_differences(checkpoint: Path, model_args: ModelArguments, args: TrainingArguments) -> dict[str, list[str]]:
    """This run against the checkpoint's `config.json` (else its run's), as `--flag value (...)`
    lines: "refused" (other models, earlier stages or encoder settings, on which the checkpoint's
    LoRA was trained, an earlier stage whose content changed at its path since, or a `FIXED_FLAGS`
    flag) and "changed" (other training flags, which apply from the resume on, and a model path
    other than one recorded where nothing is now: a moved model). Both empty without such a file."""
    saved = checkpoint_config(checkpoint)
    try:
        saved_model, saved_training = dict(saved["model"]), dict(saved["training"])
    except (KeyError, TypeError, ValueError):
        return {"refused": [], "changed": []}
    moved = [name for name in ("pretrained_model", "t5_model") if _moved(str(saved_model.get(name)), getattr(model_args, name))]
    kept = [name for name in (*ModelArguments.ENCODING, "adapter", "init_from") if name not in moved]
    refused = model_args.encoding_differences(saved_model, kept)
    changed = [f"{line}, as the recorded one is not there now" for line in model_args.encoding_differences(saved_model, moved)]
    if not refused:  # the same paths: the same weights? (a frozen --adapter too; align trains its own)
        recorded = saved.get("weights_sha256") or {}  # absent: an older run
        named = [("--init_from", source, digest) for source, digest in zip(model_args.init_from, recorded.get("init_from") or [])]
        if model_args.adapter and recorded.get("adapter") and not saved_training.get("train_adapter"):
            named.append(("--adapter", model_args.adapter, recorded["adapter"]))
        for flag, source, digest in named:
            local = local_path(source, "LoRA" if flag == "--init_from" else "adapter")
            now = weights_digest(local) if flag == "--init_from" else content_digest(local)
            if now != digest:
                refused.append(f"{flag} {source} as it was then (sha256 {digest}; it is {now} now: changed since)")
    for name, value in asdict(args).items():
        if name in RESUMABLE_FLAGS or name not in saved_training or same_setting(saved_training[name], value):
            continue
        (refused if name in FIXED_FLAGS else changed).append(f"--{name} {saved_training[name]} (this run: {value})")
    return {"refused": refused, "changed": changed}


def prepare_output_dir(
    model_args: ModelArguments, args: TrainingArguments, accelerator: Accelerator, stage: str
) -> Path | None:
    """`check_output_dir`, then make the folder ready (`--overwrite` clears an old run's outputs) and
    name the training flags a resume changes. Returns the checkpoint to resume."""
    resume, changed = _checked_resume(model_args, args, stage)
    out = Path(args.output_dir)
    if resume is None and args.overwrite and holds_run(out) and accelerator.is_main_process:
        for name in ("checkpoints", "final", "validation", "logs", "config.json"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if changed and accelerator.is_main_process:
        logger.warning("resuming with changed flags (the checkpoint's value, then this run's, which applies from here on): %s", ", ".join(changed))
    accelerator.wait_for_everyone()
    return resume


def set_aside_later_work(out: Path, resume: Path, accelerator: Accelerator) -> None:
    """Resuming from a checkpoint older than the run's newest abandons what came after it: the newer
    checkpoints (which `latest` would pick and pruning would keep) and `final/` move, untouched, to
    `checkpoints/abandoned_K/`, where nothing resumes from or prunes them. Call it once the
    checkpoint has loaded (a damaged one must not hide the good ones), on every process."""
    if accelerator.is_main_process:
        step = (saved_state(resume) or {}).get("global_step", math.inf)
        later = [d for d in checkpoint_dirs(str(out)) if checkpoint_step(d) > step]
        if later:  # else `final/`, if any, is the newest checkpoint's state, which this run continues
            index = 0
            while (out / "checkpoints" / f"abandoned_{index}").exists():
                index += 1
            target = out / "checkpoints" / f"abandoned_{index}"
            target.mkdir()
            for folder in later + ([out / "final"] if (out / "final").is_dir() else []):
                os.replace(folder, target / folder.name)
            logger.warning("resuming from step %s: the run's later checkpoints and final/ are moved to %s", step, target)
    accelerator.wait_for_everyone()  # every process, whatever the main one found


def trainable_file(index: int) -> str:
    """File name of the trainable tensors of a stage's `index`-th trainable module in a checkpoint."""
    return f"trainable_{index}.safetensors"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that train in `model` (LoRA, adapter), by parameter name, on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An optimizer `state_dict()` -> (tensors, metadata) of one safetensors file.

    Per-parameter tensors (AdamW: `step`, `exp_avg`, `exp_avg_sq`) are keyed `state.{id}.{name}`;
    the param groups and any non-tensor per-parameter value go into the header as JSON.
    `unflatten_optimizer_state` is the exact inverse.
    """
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for param_id, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                other.setdefault(str(param_id), {})[name] = value
    metadata = {"param_groups": json.dumps(state_dict["param_groups"]), "other_state": json.dumps(other)}
    return tensors, metadata


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    """(tensors, metadata) of `flatten_optimizer_state` -> the optimizer `state_dict()` again."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in json.loads(metadata["other_state"]).items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": json.loads(metadata["param_groups"])}


def save_checkpoint(
    accelerator: Accelerator,
    args: TrainingArguments,
    step: int,
    modules: list[nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    state: dict[str, Any],
    stage_files: Callable[[Path], None],
) -> None:
    """Write `checkpoints/step_N` atomically, in safetensors and JSON only (no pickles).

    Files: `trainable_{i}.safetensors` (the trainable tensors of `modules[i]`; the frozen base is
    reloaded from the model folders, so a checkpoint stays small), `optimizer.safetensors`
    (`flatten_optimizer_state`), `training_state.json` (`state` plus the LR scheduler's and,
    with fp16, the grad scaler's state) and what `stage_files(folder)` writes (the loop: the
    stage folder files of `write_stage_files`, so a checkpoint samples and feeds the next stage as
    `final/` does). No RNG state is needed: every micro-step reseeds from
    `step_seed`. DDP ranks hold identical weights and optimizer state, so the main process writes
    everything into a temporary folder and renames it; a crash mid-save leaves only the temporary
    folder, which `checkpoint_dirs` ignores. A step saved again replaces its folder by two renames
    and deletes the old version only once the new one is in place (a crash between the renames
    leaves it as `.old_step_N`). Old checkpoints beyond the limit are pruned.
    """
    if accelerator.is_main_process:
        root = Path(args.output_dir) / "checkpoints"
        final = root / f"step_{step:07d}"
        temporary = root / f".tmp_step_{step:07d}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        for index, module in enumerate(modules):
            save_file(trainable_state(accelerator.unwrap_model(module)), temporary / trainable_file(index))
        tensors, metadata = flatten_optimizer_state(optimizer.state_dict())
        save_file(tensors, temporary / OPTIMIZER_FILE, metadata=metadata)
        stage_files(temporary)
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        full_state = {**state, "lr_scheduler": lr_scheduler.state_dict(), "grad_scaler": scaler}
        (temporary / STATE_FILE).write_text(json.dumps(full_state, indent=2))  # written last: marks it complete
        replaced = root / f".old_step_{step:07d}"  # step N saved again (a window without an optimizer step)
        if final.exists():
            shutil.rmtree(replaced, ignore_errors=True)  # one a crash left after the second rename
            os.replace(final, replaced)
        os.replace(temporary, final)
        shutil.rmtree(replaced, ignore_errors=True)
        complete = checkpoint_dirs(args.output_dir)
        if args.checkpoints_total_limit:  # 0 keeps all; the newest is the one just written
            for old in complete[: max(len(complete) - args.checkpoints_total_limit, 0)]:
                shutil.rmtree(old)
        for leftover in root.glob(".tmp_step_*"):  # of saves cut off by a crash
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()


def earlier_hint(path: Path) -> str:
    """For an error about checkpoint `path`: "; resume from an earlier one: ..." naming the run's
    newest complete checkpoint before it, or "" when there is none."""
    step = checkpoint_step(path)
    found = checkpoint_dirs(str(path.parent.parent)) if step is not None else []
    earlier = [d for d in found if checkpoint_step(d) < step]
    return f"; resume from an earlier one: --resume_from {earlier[-1]}" if earlier else ""


def load_checkpoint(
    accelerator: Accelerator,
    path: Path,
    modules: list[nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote into this run's modules, optimizer, scheduler and scaler.

    A checkpoint whose trainable tensors differ from this run's (another stage, rank or model) or
    that lacks a file is a `UserError`. Returns the saved `training_state.json`.
    """
    names = [trainable_file(index) for index in range(len(modules))] + [OPTIMIZER_FILE]
    missing = [name for name in names if not (path / name).exists()]
    if missing:
        raise UserError(
            f"checkpoint '{path}' has no {missing[0]}: it is incomplete or was written by another version{earlier_hint(path)}"
        )
    if (path / trainable_file(len(modules))).exists():
        raise UserError(
            f"checkpoint '{path}' trained more modules than this run ({len(modules)}); resume with the same "
            "settings (e.g. --train_adapter)"
        )
    try:  # read every file before anything is restored: a damaged one changes nothing
        states = [load_file(path / trainable_file(index)) for index in range(len(modules))]
        with safe_open(path / OPTIMIZER_FILE, framework="pt") as file:
            optimizer_state = unflatten_optimizer_state({key: file.get_tensor(key) for key in file.keys()}, file.metadata())
        saved = json.loads((path / STATE_FILE).read_text())
        expected = {"global_step", "micro_step", "nonfinite_in_a_row", "sampler", "bad_rows", "stateful", "lr_scheduler", "grad_scaler"}
        missing = expected - saved.keys()
        if missing:
            raise KeyError(f"{STATE_FILE} lacks {sorted(missing)[0]}")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"checkpoint '{path}' is damaged ({error.__class__.__name__}: {error}){earlier_hint(path)}") from None
    for index, (module, state) in enumerate(zip(modules, states)):
        model = accelerator.unwrap_model(module)
        expected = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
        if {name: tensor.shape for name, tensor in state.items()} != expected:
            raise UserError(f"checkpoint '{path}' does not match this run's trainable parameters (model {index})")
        model.load_state_dict(state, strict=False)
    optimizer.load_state_dict(optimizer_state)
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if accelerator.scaler is not None and saved["grad_scaler"] is not None:  # else fp16 starts a fresh scale
        accelerator.scaler.load_state_dict(saved["grad_scaler"])
    return saved


# ------------------------------------------------------------------------------ validation
@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Inside the block the given modules (None skipped) are in eval mode; after it, in their old mode."""
    present = [module for module in modules if module is not None]
    was_training = [module.training for module in present]
    for module in present:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(present, was_training):
            module.train(mode)


def validate(accelerator: Accelerator, args: TrainingArguments, parts: StageParts, settings: ValidationSettings, step: int) -> Path | None:
    """Generate the fixed held-out prompts with fixed seeds; save a grid PNG and log it."""
    if not accelerator.is_main_process or not args.validation_prompts:
        return None
    from diffusers.utils import make_image_grid

    unet = accelerator.unwrap_model(parts.unet)
    adapter = parts.encoder.adapter
    if adapter is not None:
        parts.encoder.adapter = accelerator.unwrap_model(adapter)
    spec = get_sampler(settings.sampler)
    images = []
    try:  # the unwrapped adapter goes back even when sampling fails (out of memory, ...)
        pipeline = LongPromptPipeline.from_components(parts.vae, unet, parts.noise_scheduler, parts.encoder)
        pipeline.set_sampler(settings.sampler)
        with eval_mode(unet, parts.encoder.adapter), accelerator.autocast():  # no LoRA / adapter dropout
            for index, prompt in enumerate(args.validation_prompts):
                generator = torch.Generator().manual_seed(args.seed + index)
                (image,), _ = pipeline(
                    [prompt],
                    steps=spec.steps if settings.steps is None else settings.steps,
                    guidance_scale=spec.guidance_scale if settings.guidance_scale is None else settings.guidance_scale,
                    height=args.resolution,
                    width=args.resolution,
                    generator=generator,
                    show_progress=False,
                )
                images.append(image)
    finally:
        parts.encoder.adapter = adapter
    grid = make_image_grid(images, rows=1, cols=len(images))
    path = Path(args.output_dir) / "validation" / f"step_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    log_images(accelerator, grid, step)
    return path


def validate_or_warn(accelerator: Accelerator, args: TrainingArguments, parts: StageParts, settings: ValidationSettings, step: int) -> None:
    """`validate` in the loop and after `final/`, where a failure (out of memory beside the training
    state, say) is a warning: a diagnostic must not end the run and lose the steps since the last
    checkpoint, nor leave the other ranks waiting for the main one, the only one that validates."""
    try:
        validate(accelerator, args, parts, settings, step)
    except Exception as error:  # sampling fails in many classes; the run itself is unharmed
        logger.warning("validation at step %d failed, training goes on: %s", step, error_line(error))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def log_images(accelerator: Accelerator, grid, step: int) -> None:
    """Send the validation grid to the active tracker (tensorboard or wandb)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": wandb.Image(grid)}, step=step)


# ------------------------------------------------------------------------------ final output
def write_final(
    accelerator: Accelerator,
    args: TrainingArguments,
    model_args: ModelArguments,
    parts: StageParts,
    stage: str,
    step: int,
    sampler: str = "unipc",
) -> Path:
    """`final/`: the stage folder files (`write_stage_files`) and a model card whose sampling
    command uses `sampler` (the stage's validation sampler: lcm for LCM stages)."""
    final = Path(args.output_dir) / "final"
    if accelerator.is_main_process:
        final.mkdir(parents=True, exist_ok=True)
        write_stage_files(accelerator, args, model_args, parts, stage, final)
        (final / "README.md").write_text(model_card(stage, model_args, args, step, sampler))
    accelerator.wait_for_everyone()
    return final


def write_stage_files(
    accelerator: Accelerator, args: TrainingArguments, model_args: ModelArguments, parts: StageParts, stage: str, folder: Path
) -> None:
    """What makes `folder` a stage folder (for `sample.py --init_from` and the next stage): the
    diffusers-format LoRA, `adapter/` and `config.json` (with `adapter_source`). Main process only.

    `adapter/` is the adapter this stage was trained with: the trained one, or a byte copy of the
    frozen one it loaded, so a stage folder names its own conditioning and `--init_from ... final`
    (the model card's command, the next stage) picks the right adapter.
    """
    save_lora(accelerator.unwrap_model(parts.unet), folder, stage)
    adapter = parts.encoder.adapter
    if adapter is not None and any(p.requires_grad for p in adapter.parameters()):
        accelerator.unwrap_model(adapter).save_pretrained(folder / "adapter")
    elif adapter is not None and parts.adapter_source is not None:
        shutil.rmtree(folder / "adapter", ignore_errors=True)
        shutil.copytree(parts.adapter_source, folder / "adapter")
    config = resolved_config(stage, model_args, args, accelerator, parts)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def resolved_config(
    stage: str, model_args: ModelArguments, args: TrainingArguments, accelerator: Accelerator, parts: StageParts
) -> dict:
    """Everything this run was configured with, as JSON, and what it was built on: the local
    adapter folder and `weights_sha256`, the content digests of that adapter and of the
    `--init_from` stages (a resume or a later stack refuses or names a stage changed since)."""
    return {
        "stage": stage,
        "model": asdict(model_args),
        "training": asdict(args),
        "num_processes": accelerator.num_processes,
        "adapter_source": parts.adapter_source,
        "weights_sha256": parts.weights_sha256,
    }


def model_card(stage: str, model_args: ModelArguments, args: TrainingArguments, step: int, sampler: str = "unipc") -> str:
    """A short README for `final/`: what it is, what it was trained on, how to sample with it."""
    init = " ".join(model_args.init_from) or "(none)"
    sampler_flag = "" if sampler == "unipc" else f"--sampler {sampler} "
    encoding_flags = "".join(f"{flag} " for flag in model_args.encoding_flags())
    return (
        f"# LongAlign stage `{stage}`\n\n"
        f"UNet LoRA (rank {args.lora_rank}, scale 1) for Stable Diffusion 1.5 with long-prompt conditioning "
        f"({model_args.encoder_mode}, token_length {model_args.token_length}), trained for {step} optimizer steps "
        f"on `{args.dataset}`.\n\n"
        f"- base: `{model_args.pretrained_model}`, T5: `{model_args.t5_model}`\n"
        f"- earlier stages fused before training: {init}\n"
        f"- files: `pytorch_lora_weights.safetensors` (diffusers format), `adapter/` (the text adapter this stage "
        f"was trained with), "
        f"`config.json` (the resolved configuration)\n\n"
        "Sample with it:\n\n"
        f"```bash\npython sample.py --init_from {' '.join(model_args.init_from + [str(Path(args.output_dir) / 'final')])} "
        f"{sampler_flag}{encoding_flags}--prompt \"...\"\n```\n"
    )


def check_ranks_agree(accelerator: Accelerator, params: list[torch.Tensor]) -> None:
    """Fail loudly if the processes ended with different trainable weights (a broken DDP sync)."""
    if accelerator.num_processes == 1:
        return
    fingerprint = torch.stack([p.detach().double().sum() for p in params]).to(accelerator.device)
    gathered = accelerator.gather(fingerprint[None])  # (P, n_params)
    if not torch.equal(gathered.min(0).values, gathered.max(0).values):
        raise RuntimeError("the processes hold different trainable weights after training: DDP did not sync")
    logger.info("all %d processes hold the same trainable weights", accelerator.num_processes)


# ---------------------------------------------------------------------------------- the loop

def every_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True when `flag` holds on every process (one gather; every process must call it)."""
    flags = accelerator.gather(torch.tensor([float(flag)], device=accelerator.device))  # (P,)
    return bool(flags.min())


class StopSignals:
    """While active: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (a cluster's notice before it ends a job)
    ask the loop to stop. `received` is the first one's number (0: none); the loop shares it over
    the ranks, checkpoints at the end of the accumulation window and exits (`stopped`), so
    `--resume_from latest` continues exactly. A second Ctrl-C stops at once. Outside the main
    thread (where Python cannot take signals) it does nothing."""

    def __init__(self) -> None:
        self.received = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self.handle) for signum in STOP_SIGNALS}
        return self

    def handle(self, signum: int, frame: object) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.received:
            self.received = signum
            logger.warning("%s: stopping with a checkpoint once the optimizer step under way (or the next) ends", signal.Signals(signum).name)

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def stopped(accelerator: Accelerator, args: TrainingArguments, signum: int, step: int) -> None:
    """End a run that a signal stopped (`StopSignals`): say where its checkpoint is and exit with
    128 + the signal's number, as a process that signal ended would; `final/` is not written."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        found = checkpoint_dirs(args.output_dir)
        where = f"its checkpoint is {found[-1]}; continue with --resume_from latest" if step and found else "no step was made"
        print(f"stopped by {signal.Signals(signum).name} at step {step}: {where}", file=sys.stderr)
    raise SystemExit(128 + signum)


def step_seed(seed: int, micro_step: int, rank: int) -> int:
    """The seed of one micro-step on one rank (noise, timesteps, dropout): a pure function."""
    return (seed * 1_000_003 + micro_step * 1_009 + rank) % (2**63 - 1)


def _jsonable(value: Any) -> Any:
    """Tensors -> nested lists, so small states (an EMA direction) fit the JSON state file."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    return value


def _set_path(root: Any, path: str, value: Any) -> None:
    *parents, name = path.split(".")
    for parent in parents:
        root = getattr(root, parent)
    setattr(root, name, value)


def prepare_optimization(accelerator: Accelerator, args: TrainingArguments, stage: Stage) -> tuple[list[nn.Parameter], Any, Any]:
    """Trainable modules in train mode with fp32 weights (the UNet's, its LoRA, in `--lora_dtype`),
    AdamW (its moments in the weights' dtype), warmup-then-constant LR, `prepare`.

    The prepared modules replace the originals inside `stage.parts` (and `stage.trainable`), so the
    loss sees them. Returns (trainable parameters, optimizer, lr scheduler).
    """
    modules = list(stage.trainable.values())
    for path, module in stage.trainable.items():
        module.train()  # diffusers and transformers load in eval mode, where LoRA dropout does nothing
        dtype = getattr(torch, args.lora_dtype) if path == "unet" else torch.float32
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.to(dtype)
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )
    # The loop steps the scheduler once per optimizer step (make_accelerator: step_scheduler_with_optimizer
    # off), so warmup counts optimizer steps whatever the number of processes, also across a resume on another.
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.lr_warmup_steps)
    *prepared, optimizer, lr_scheduler = accelerator.prepare(*modules, optimizer, lr_scheduler)
    for path, module in zip(list(stage.trainable), prepared):
        _set_path(stage.parts, path, module)
        stage.trainable[path] = module
    return params, optimizer, lr_scheduler


def training_done(args: TrainingArguments, global_step: int, sampler: ResumableSampler) -> bool:
    """At a window's end: `--max_train_steps` optimizer steps taken or, without it, `--num_train_epochs`
    passes over the data consumed (the last window may run into the next epoch, as every window may).

    Counting data, not a step total fixed at the start, keeps the epochs right when a resume runs
    on another number of processes (the sampler rescales its position) and when windows straddle
    epochs (a 1-micro-step epoch with accumulation 2 would otherwise run twice the epochs).
    """
    if args.max_train_steps is not None:
        return global_step >= args.max_train_steps
    return sampler.epochs_consumed >= args.num_train_epochs


def expected_steps(args: TrainingArguments, global_step: int, sampler: ResumableSampler) -> int:
    """The optimizer steps the run will have taken when `training_done` (for the progress bar):
    exact with `--max_train_steps`, else counting the micro-steps left in the epochs."""
    if args.max_train_steps is not None:
        return args.max_train_steps
    per_epoch = math.ceil(sampler.num_samples / args.train_batch_size)
    left = (args.num_train_epochs - sampler.epoch) * per_epoch - math.ceil(sampler.position / args.train_batch_size)
    return global_step + max(math.ceil(left / args.gradient_accumulation_steps), 0)


@dataclass
class MicroStep:
    """What one micro-step of the loop did (`micro_step`); every rank holds the same flags."""

    usable: bool  # every rank's batch had usable rows, so the loss ran
    finite_loss: bool = False  # ... and it was finite on every rank (then it was backpropagated)
    finite_grads: bool = True  # False: the window's (all-reduced) gradients were not finite, no step
    stepped: bool = False  # the optimizer stepped (the end of an accumulation window, all finite)
    loss: float | None = None
    logs: dict[str, float] = field(default_factory=dict)
    grad_norm: float | None = None  # at a window's end: the norm before clipping
    lr: float | None = None  # the LR the optimizer step used


def micro_step(
    accelerator: Accelerator, args: TrainingArguments, stage: Stage, batch: dict, generator: torch.Generator,
    usable: bool, params: list[nn.Parameter], optimizer: Any, lr_scheduler: Any,
) -> MicroStep:  # fmt: skip
    """One micro-step: the stage's loss, backward and, at the end of an accumulation window, gradient
    clipping to `--max_grad_norm`, the AdamW step and the LR schedule's step (METHOD.md §5 "Common").

    `usable` (every rank's batch has rows) is decided before the loss by the caller, because a loss
    can make collective calls (the reward stages' common direction) that every rank must join. A
    loss that is not finite on some rank is skipped on all: no backward, and its graph is freed
    before the next forward. fp16: the grad scaler skips an overflow itself, which then counts as
    no optimizer step, as a non-finite bf16/fp32 gradient norm does.
    """
    outcome = MicroStep(usable)
    with accelerator.accumulate(*stage.trainable.values()):
        loss, logs = stage.loss_fn(stage.parts, batch, generator) if usable else (None, {})
        outcome.finite_loss = usable and every_rank(accelerator, bool(torch.isfinite(loss.detach())))
        if outcome.finite_loss:
            accelerator.backward(loss)
            outcome.loss = loss.detach().float().item()
            outcome.logs = {key: float(value) for key, value in logs.items()}
            if accelerator.sync_gradients:  # (earlier micro-steps' optimizer.step is a no-op anyway)
                grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                outcome.grad_norm = float(grad_norm)  # of the all-reduced gradients: every rank decides alike
                if accelerator.scaler is not None:
                    optimizer.step()
                    outcome.finite_grads = not optimizer.step_was_skipped
                else:
                    outcome.finite_grads = bool(torch.isfinite(grad_norm))
                    if outcome.finite_grads:
                        optimizer.step()
                if outcome.finite_grads:
                    outcome.stepped = True
                    outcome.lr = lr_scheduler.get_last_lr()[0]
                    lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)  # at the window's end only, as accelerate does
    return outcome


def run_training(model_args: ModelArguments, args: TrainingArguments, accelerator: Accelerator, stage: Stage, dataset) -> Path:
    """Train `stage` on `dataset` (items from `longalign.data`): the loop every stage shares.

    Resumes from `--resume_from`, checkpoints every `--checkpointing_steps`, validates every
    `--validation_steps`, and writes `final/`. Returns the `final/` folder.
    """
    resume = prepare_output_dir(model_args, args, accelerator, stage.name)
    params, optimizer, lr_scheduler = prepare_optimization(accelerator, args, stage)
    prepared_modules = list(stage.trainable.values())
    parts, stateful = stage.parts, stage.stateful

    sampler = ResumableSampler(len(dataset), args.seed, num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    split_caption = parts.encoder.splitter()  # the captions' CLIP segments are split in the workers
    loader = make_dataloader(dataset, sampler, args.train_batch_size, args.dataloader_num_workers, split_caption=split_caption)
    monitor = BadRowMonitor.from_settings(args, rows_per_epoch=sampler.num_samples * accelerator.num_processes)

    state = {"global_step": 0, "micro_step": 0, "nonfinite_in_a_row": 0}
    if resume is not None:
        saved = load_checkpoint(accelerator, resume, prepared_modules, optimizer, lr_scheduler)
        sampler.load_state_dict(saved["sampler"])
        monitor.load_state_dict(saved["bad_rows"])
        state.update({k: saved[k] for k in state})
        for name, obj in stateful.items():
            obj.load_state_dict(saved["stateful"][name])
        set_aside_later_work(Path(args.output_dir), resume, accelerator)
        logger.info("resumed from %s at step %d", resume, state["global_step"])
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        config = resolved_config(stage.name, model_args, args, accelerator, parts)
        (Path(args.output_dir) / "config.json").write_text(json.dumps(config, indent=2))
        accelerator.init_trackers(f"longalign-{stage.name}", config={k: str(v) for k, v in asdict(args).items()})

    progress = tqdm(
        total=expected_steps(args, state["global_step"], sampler), initial=state["global_step"], desc=stage.name,
        disable=not accelerator.is_local_main_process,
    )  # fmt: skip
    running: dict[str, float] = {}  # sums over this optimizer step's successful micro-steps
    counted = 0
    micro_steps_per_epoch = math.ceil(sampler.num_samples / args.train_batch_size)
    last_update = state["micro_step"]  # the micro-step of the last optimizer step (or of the resume)

    def checkpoint() -> None:
        """Save `checkpoints/step_N` of the current state (every process calls it)."""
        full_state = {
            **state,
            "sampler": sampler.state_dict(),
            "bad_rows": monitor.state_dict(),
            "stateful": {name: _jsonable(obj.state_dict()) for name, obj in stateful.items()},
        }
        stage_files = functools.partial(write_stage_files, accelerator, args, model_args, parts, stage.name)
        save_checkpoint(accelerator, args, state["global_step"], prepared_modules, optimizer, lr_scheduler, full_state, stage_files)

    # SIGTERM, SIGINT, SIGUSR1: a checkpoint at the next optimizer step, then exit; the workers end with the loop.
    with StopSignals() as stop, closing_workers(loader):
        finished = training_done(args, state["global_step"], sampler)
        stop_signal = 0  # the signal that asked the ranks to stop (0: none), the same on every rank
        halted = False  # stopped for it, at the end of an accumulation window (where a checkpoint is exact)
        while not finished and not halted:
            for batch in loader:
                # One collective per micro-step: every rank's usable rows, the signal it received (0: none)
                # and `batch_counts`, (P, 3 + reasons).
                counts = [len(batch["caption"]), stop.received, *monitor.batch_counts(batch)]
                counts = accelerator.gather(torch.tensor([counts], device=accelerator.device))
                stop_signal = stop_signal or int(counts[:, 1].max())  # every rank sees it at the same micro-step
                monitor.update(batch, counts[:, 2:].sum(0).tolist())  # all ranks count alike and stop together
                sampler.advance(batch["num_rows"])
                seed = step_seed(args.seed, state["micro_step"], accelerator.process_index)
                torch.manual_seed(seed)  # LoRA / adapter dropout
                generator = torch.Generator().manual_seed(seed)
                usable = bool(counts[:, 0].min() > 0)  # every row of a batch can be bad (skipped)
                batch["global_step"] = state["global_step"]  # for a loss with a schedule (`Stage`)
                done = micro_step(accelerator, args, stage, batch, generator, usable, params, optimizer, lr_scheduler)
                state["micro_step"] += 1
                if done.finite_loss:
                    counted += 1
                    for key, value in {"loss": done.loss, **done.logs}.items():
                        running[key] = running.get(key, 0.0) + value
                elif not done.usable:
                    logger.warning("micro-step %d skipped: a batch had no usable rows", state["micro_step"])
                else:
                    logger.warning("non-finite loss at micro-step %d: skipped", state["micro_step"])
                if done.usable and not (done.finite_loss and done.finite_grads):
                    if done.finite_loss:
                        logger.warning("non-finite gradient at micro-step %d: skipped", state["micro_step"])
                    state["nonfinite_in_a_row"] += 1  # since the last optimizer step
                    if state["nonfinite_in_a_row"] >= args.max_nonfinite_steps:
                        raise UserError(
                            f"{state['nonfinite_in_a_row']} non-finite losses or gradients without an optimizer step "
                            "between them; lower --learning_rate or use --mixed_precision bf16/no"
                        )
                if not accelerator.sync_gradients:
                    continue
                if not done.stepped:
                    # No update: the window's gradients are dropped and the step is not counted, so
                    # global_step, the LR schedule and the checkpoints count optimizer steps only.
                    logger.warning("no optimizer step at micro-step %d: its window's gradients are dropped", state["micro_step"])
                    running, counted = {}, 0
                    if state["micro_step"] - last_update > micro_steps_per_epoch + args.gradient_accumulation_steps:
                        raise UserError("a whole epoch passed without an optimizer step (no usable rows, or none with finite gradients)")
                    if (finished := training_done(args, state["global_step"], sampler)) or (halted := bool(stop_signal)):
                        if state["global_step"]:  # final/ or the resume needs this point's checkpoint
                            checkpoint()
                        break
                    continue
                last_update = state["micro_step"]
                state["nonfinite_in_a_row"] = 0
                state["global_step"] += 1
                step = state["global_step"]
                logged = {key: value / max(counted, 1) for key, value in running.items()}
                logged["lr"] = done.lr
                logged["grad_norm"] = done.grad_norm
                running, counted = {}, 0
                accelerator.log(logged, step=step)
                progress.update(1)
                progress.set_postfix(loss=f"{logged.get('loss', float('nan')):.4f}")
                finished = training_done(args, step, sampler)
                if step % args.checkpointing_steps == 0 or finished or stop_signal:
                    checkpoint()
                if args.validation_steps and step % args.validation_steps == 0 and not (finished or stop_signal):
                    validate_or_warn(accelerator, args, parts, stage.validation, step)
                if finished or (halted := bool(stop_signal)):
                    break
            else:
                sampler.next_epoch()
    progress.close()
    if halted:
        stopped(accelerator, args, stop_signal, state["global_step"])
    check_ranks_agree(accelerator, params)
    final = write_final(accelerator, args, model_args, parts, stage.name, state["global_step"], stage.validation.sampler)
    validate_or_warn(accelerator, args, parts, stage.validation, state["global_step"])
    accelerator.wait_for_everyone()  # no rank tears the process group down while another still uses it
    accelerator.end_training()
    if accelerator.is_main_process:
        logger.info("%s done at step %d: %s holds the LoRA, its adapter and, in README.md, the command to sample it",
                    stage.name, state["global_step"], final)  # fmt: skip
    return final
