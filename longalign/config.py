"""Typed configuration: one dataclass per concern, the paper's settings as defaults.

Parsed with `transformers.HfArgumentParser`, so every field is a `--flag` with its help text.
The resolved configuration is written next to every output (`config.json`).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from .data import DataSettings
from .diffusion import RolloutSettings, get_loss, get_rollout
from .loading import UserError
from .reward import RewardConfig
from .text_encoding import SD15, SEGMENTERS, T5_LARGE, check_encoder_mode, checked_token_length, get_segmenter

logger = logging.getLogger(__name__)


def same_setting(a: Any, b: Any) -> bool:
    """Equal values, where two spellings of one local path (relative, absolute, a trailing `/`) are
    equal too, also inside lists (`--init_from`)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_setting(x, y) for x, y in zip(a, b))
    if a == b or not (isinstance(a, str) and isinstance(b, str)):
        return a == b
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_positive(values: dict[str, float]) -> None:
    """A `UserError` naming the first `--flag` whose value is not a positive finite number."""
    for flag, value in values.items():
        if not 0 < value < math.inf:
            raise UserError(f"{flag} must be a positive number (got {value})")


@dataclass
class ModelArguments:
    """Which models to load (shared by sample.py and the training scripts)."""

    pretrained_model: str = field(
        default=SD15, metadata={"help": "SD1.5 pipeline: hub id or local folder (unet, vae, text_encoder, tokenizer, scheduler)"}
    )
    t5_model: str = field(default=T5_LARGE, metadata={"help": "T5 encoder + tokenizer: hub id or local folder"})
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "TextAdapter folder (hub path org/repo/folder or local); default: the adapter/ of the last --init_from "
            "stage folder; with no --init_from, align trains shihaozhao/LaVi-Bridge/t5_unet/adapter and sample.py uses the "
            "released LongSD weights, adapter and LoRAs"
        },
    )
    init_from: list[str] = field(
        default_factory=list,
        metadata={"help": "earlier stage LoRAs fused into the UNet in order: stage folders (runs/align-x/final), .safetensors or released .pt files"},
    )
    encoder_mode: str = field(default="clip+t5", metadata={"help": "text conditioning: clip+t5 (paper), clip or t5 (ablation)"})
    segmenter: str = field(default="sentences", metadata={"help": f"prompt splitting: one of {', '.join(SEGMENTERS)} (legacy: the released rule, which sample.py picks for the released LongSD weights)"})
    token_length: int = field(default=240, metadata={"help": "tokens per branch (CLIP segments and T5) in the UNet context"})

    # The settings a stage's LoRA is tied to: sampling it with others conditions the UNet differently.
    ENCODING = ("pretrained_model", "t5_model", "encoder_mode", "segmenter", "token_length")

    def __post_init__(self) -> None:
        check_encoder_mode(self.encoder_mode)  # a typo fails here, not after the UNet has loaded
        get_segmenter(self.segmenter)
        checked_token_length(self.token_length)
        seen = set()
        for source in self.init_from:
            key = os.path.realpath(source) if os.path.exists(source) else source
            if key in seen:
                raise UserError(f"--init_from names '{source}' twice: its LoRA would be fused twice")
            seen.add(key)

    def encoding_flags(self) -> list[str]:
        """`--flag value` for each of `ENCODING` that is not the default (for a model card's command)."""
        defaults = ModelArguments()
        return [f"--{name} {getattr(self, name)}" for name in self.ENCODING if getattr(self, name) != getattr(defaults, name)]

    def encoding_differences(self, trained: dict, names: Sequence[str] = ENCODING) -> list[str]:
        """`--flag`s of `names` whose value differs from `trained` (a stage's `config.json` "model")."""
        return [
            f"--{name} {trained[name]} (this run: {getattr(self, name)})"
            for name in names
            if name in trained and not same_setting(trained[name], getattr(self, name))
        ]


VALIDATION_PROMPTS = (
    "A quiet harbour town at dusk. Three fishing boats with red hulls rest against a wooden pier, "
    "and a lighthouse with a green lamp stands on the rocks to the left. Above the hills on the right, "
    "a full moon rises behind thin clouds. In the foreground, an old man in a yellow raincoat mends a net "
    "while a black cat sleeps on a coil of rope beside him.",
    "A sunlit kitchen seen from the doorway. On the marble counter there is a blue ceramic bowl filled with "
    "lemons, a loaf of bread on a cutting board, and a copper kettle. A window above the sink shows a garden "
    "with white roses. A child in a striped shirt reaches for a cookie jar on the top shelf, and a small "
    "brown dog watches from the tiled floor.",
)


@dataclass
class TrainingArguments(DataSettings):
    """The loop's settings, shared by every stage (METHOD.md §5 "Common"; released launcher)."""

    output_dir: str = field(default="runs/unnamed", metadata={"help": "where checkpoints/, final/, logs and validation images go"})
    train_batch_size: int = field(default=16, metadata={"help": "batch size per process"})
    gradient_accumulation_steps: int = field(default=2, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=3e-5, metadata={"help": "AdamW learning rate after warmup"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    lr_warmup_steps: int = field(default=2000, metadata={"help": "linear warmup, in optimizer steps; constant after"})
    max_grad_norm: float = field(default=0.3, metadata={"help": "gradient-norm clipping"})
    num_train_epochs: int = field(default=2, metadata={"help": "epochs, unless --max_train_steps is given"})
    max_train_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps (overrides epochs)"})
    checkpointing_steps: int = field(default=500, metadata={"help": "save a resumable checkpoint every N optimizer steps"})
    checkpoints_total_limit: int = field(default=3, metadata={"help": "keep at most this many checkpoints (0: keep all)"})
    resume_from: str | None = field(
        default=None,
        metadata={"help": "'latest' (error if none), 'auto' (latest, or start fresh if none) or a checkpoint folder"},
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing run in --output_dir"})
    mixed_precision: str = field(default="bf16", metadata={"help": "no, fp16 or bf16 (frozen weights in this dtype, the LoRA in --lora_dtype)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute UNet activations in backward (less memory, more time)"})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard, wandb or none"})
    seed: int = field(default=0, metadata={"help": "seed of LoRA init, noise, timesteps, dropout and data order"})
    validation_steps: int = field(default=500, metadata={"help": "generate validation images every N optimizer steps (0: only at the end)"})
    validation_prompts: list[str] = field(
        default_factory=lambda: list(VALIDATION_PROMPTS),
        metadata={"help": "fixed held-out prompts for validation images (never training captions)"},
    )
    dataloader_num_workers: int = field(default=4, metadata={"help": "DataLoader worker processes per rank"})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank (alpha = rank, scale 1)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "dropout on each LoRA branch's output, dropout(B(A(x))), as released"})
    lora_dtype: str = field(
        default="float32",
        metadata={"help": "the LoRA's weights and AdamW moments: float32 (master weights, as mixed-precision training keeps "
                          "them) or bfloat16 (as the released stages trained them, where many small updates round away)"},
    )  # fmt: skip
    max_nonfinite_steps: int = field(default=10, metadata={"help": "stop after this many non-finite losses or gradients without an optimizer step between them"})
    cpu: bool = field(default=False, metadata={"help": "run on CPU even when a GPU is present"})

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "--train_batch_size": self.train_batch_size,
            "--gradient_accumulation_steps": self.gradient_accumulation_steps,
            "--checkpointing_steps": self.checkpointing_steps,
            "--num_train_epochs": self.num_train_epochs,
        }
        for flag, value in checks.items():
            if value < 1:
                raise UserError(f"{flag} must be at least 1 (got {value})")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise UserError(f"--max_train_steps must be at least 1 (got {self.max_train_steps})")
        if self.checkpoints_total_limit < 0:
            raise UserError(f"--checkpoints_total_limit must be at least 0 (0 keeps all; got {self.checkpoints_total_limit})")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"--mixed_precision must be no, fp16 or bf16 (got {self.mixed_precision})")
        if self.report_to not in ("tensorboard", "wandb", "none"):
            raise UserError(f"--report_to must be tensorboard, wandb or none (got {self.report_to})")
        if self.report_to == "wandb" and importlib.util.find_spec("wandb") is None:  # accelerate would log nothing
            raise UserError("--report_to wandb needs the wandb package (pip install wandb), or use tensorboard")
        if self.resume_from is not None and self.overwrite:
            raise UserError("--resume_from and --overwrite contradict each other; pick one")
        check_positive({"--learning_rate": self.learning_rate, "--max_grad_norm": self.max_grad_norm, "--adam_epsilon": self.adam_epsilon})
        for flag, beta in {"--adam_beta1": self.adam_beta1, "--adam_beta2": self.adam_beta2}.items():
            if not 0.0 <= beta < 1.0:
                raise UserError(f"{flag} must be in [0, 1) (got {beta})")
        if not 0.0 <= self.adam_weight_decay < math.inf:
            raise UserError(f"--adam_weight_decay must be 0 or more (got {self.adam_weight_decay})")
        if self.validation_steps < 0:
            raise UserError(f"--validation_steps must be 0 (only at the end) or more (got {self.validation_steps})")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"--lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.lora_dtype not in ("float32", "bfloat16"):
            raise UserError(f"--lora_dtype must be float32 or bfloat16 (got {self.lora_dtype})")
        if self.dataloader_num_workers < 0:
            raise UserError(f"--dataloader_num_workers must be 0 or more (got {self.dataloader_num_workers})")
        if self.lr_warmup_steps < 0:
            raise UserError(f"--lr_warmup_steps must be 0 or more (got {self.lr_warmup_steps})")
        if not 0 <= self.seed < 2**32:  # accelerate's set_seed seeds numpy too
            raise UserError(f"--seed must be in [0, 2**32) (got {self.seed})")


@dataclass
class AlignArguments(TrainingArguments):
    """Stage `align`: long-text fine-tuning of a UNet LoRA and the adapter (paper §3, METHOD.md §5)."""

    loss: str = field(default="mse", metadata={"help": "mse or pseudo_huber (c = --huber_c) on the noise prediction"})
    huber_c: float = field(default=0.001, metadata={"help": "pseudo-Huber c"})
    caption_dropout: float = field(default=0.1, metadata={"help": "probability of training on the empty prompt (for CFG)"})
    train_adapter: bool = field(default=True, metadata={"help": "train the T5 adapter together with the LoRA"})

    def __post_init__(self) -> None:
        super().__post_init__()
        get_loss(self.loss)  # a UserError naming the losses
        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"--caption_dropout must be in [0, 1) (got {self.caption_dropout})")
        check_positive({"--huber_c": self.huber_c})


@dataclass
class LcmArguments(TrainingArguments):
    """Stage `lcm`: LCM-LoRA distillation of the align model (METHOD.md §5)."""

    huber_c: float = field(default=0.001, metadata={"help": "pseudo-Huber c of the consistency loss"})
    teacher_guidance_scale: float = field(default=7.5, metadata={"help": "teacher CFG scale (LCM form)"})
    num_ddim_timesteps: int = field(default=50, metadata={"help": "DDIM solver steps over the 1000 training timesteps"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_ddim_timesteps < 1:  # the scheduler's training timesteps bound it above (lcm_timesteps)
            raise UserError(f"--num_ddim_timesteps must be positive (got {self.num_ddim_timesteps})")
        check_positive({"--huber_c": self.huber_c})


@dataclass
class RewardArguments(TrainingArguments, RewardConfig):
    """Stages `reward` / `reward_lcm`: decomposed preference optimisation (paper §4, METHOD.md §4-5).

    The reward's own options (`--reward_model`, `--text_irrelevant_weight` w = 0.3, `--common_direction`,
    ...) come from `RewardConfig`.
    """

    train_batch_size: int = field(default=8, metadata={"help": "batch size per process"})
    gradient_accumulation_steps: int | None = field(
        default=None, metadata={"help": "micro-batches per optimizer step (None: 1 for reward, 2 for reward_lcm)"}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "also checkpoint inside the UNet: less memory, but each gradient step's forward runs three "
            "times (the rollout checkpoints those calls already)"
        },
    )
    num_train_epochs: int = field(default=1, metadata={"help": "epochs, unless --max_train_steps is given"})
    rollout: str = field(default="ddim_cfg", metadata={"help": "ddim_cfg (stage reward) or lcm (stage reward_lcm)"})
    guidance_scale: float = field(default=RolloutSettings.guidance_scale, metadata={"help": "CFG scale of the ddim_cfg rollout"})
    rollout_steps: int = field(
        default=RolloutSettings.rollout_steps, metadata={"help": "ddim_cfg: DDIM steps of the rollout (a divisor of 1000)"}
    )
    grad_steps: int = field(default=RolloutSettings.grad_steps, metadata={"help": "ddim_cfg: rollout steps whose UNet call carries gradient"})
    grad_stride: int = field(
        default=RolloutSettings.grad_stride, metadata={"help": "ddim_cfg: gradient at steps r, r + stride, ... (r uniform in 0..stride-1)"}
    )

    def __post_init__(self) -> None:
        get_rollout(self.rollout)  # a bad --rollout fails before any model loads
        if self.gradient_accumulation_steps is None:  # the released launcher's: reward 8 x 1, reward_lcm 8 x 2
            self.gradient_accumulation_steps = 2 if self.rollout == "lcm" else 1
        TrainingArguments.__post_init__(self)
        RewardConfig.__post_init__(self)  # not reached through super(): DataSettings ends that chain
        if self.gradient_checkpointing:
            logger.warning(
                "--gradient_checkpointing in a reward stage: the rollout already checkpoints each UNet call with "
                "gradient, so each such forward now runs three times; use it only to save more memory"
            )
        if self.rollout == "lcm":
            given = [f"--{name}" for name in ("guidance_scale", "rollout_steps", "grad_steps", "grad_stride")
                     if getattr(self, name) != getattr(RewardArguments, name)]  # fmt: skip
            if given:
                logger.warning("%s: no effect with --rollout lcm (4 LCM steps, all with gradient, no CFG)", ", ".join(given))
        self.rollout_settings()  # grad steps that do not fit the rollout fail here

    def rollout_settings(self) -> RolloutSettings:
        """The differentiable rollout's settings from these flags (the released recipe by default);
        with `--rollout lcm`, which has none of the DDIM flags, the defaults."""
        if self.rollout == "lcm":
            return RolloutSettings()
        return RolloutSettings(
            rollout_steps=self.rollout_steps, guidance_scale=self.guidance_scale,
            grad_steps=self.grad_steps, grad_stride=self.grad_stride,
        )  # fmt: skip


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each flag's help, left out where X is None or False (a
    switch), or where the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def parse_flags(dataclass_types: Sequence[type], argv: list[str] | None = None) -> tuple[Any, ...]:
    """`--flags` (argv, default sys.argv) -> one instance per dataclass, via `HfArgumentParser`.

    An unknown flag is a `UserError` naming it (HfArgumentParser raises a bare ValueError), and so
    is a prefix of a flag (argparse would take `--learning 1e-4` for `--learning_rate`); a value of
    the wrong type is argparse's usage line and `error:` line, exit 2.
    """
    from transformers import HfArgumentParser

    program = os.path.basename(sys.argv[0]) or "longalign"
    parser = HfArgumentParser(list(dataclass_types), usage=f"{program} [--flags]", allow_abbrev=False, formatter_class=_DefaultsHelp)
    *parsed, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if unknown:
        raise UserError(f"unknown flag(s) {' '.join(unknown)}; {program} --help lists the flags")
    return tuple(parsed)
