"""What each LongAlign stage costs, and where the time goes (issue 6; DESIGN.md "Tests": timing lives here).

    python bench/run.py --size tiny --stage all                  # CPU smoke numbers, well under a minute
    python bench/run.py --size tiny --stage chain                # the tiny align -> lcm -> reward -> reward_lcm chain
    python bench/run.py --size sd15 --stage all --gpu-table      # the GPU table (SD1.5 size, 512 px, bf16, SDPA)
    python bench/run.py --size sd15 --stage align --device cpu --resolution 64 --batch-size 1 --steps 1 --warmup 0

Each stage's real step is timed: parts from `longalign.training.load_stage_parts` (on random-weight
models written in the hub layout by `bench/models.py`) and the loop's own `micro_step`: the stage
script's loss function (`align_loss`, `lcm_loss`, `reward_loss`), `accelerator.backward`, gradient
clipping and the AdamW step, as `run_training` runs them (data loading excluded: it runs in
DataLoader workers beside the step). Mixed precision is the training default (bf16 on a GPU through
accelerate, fp32 on a CPU; `--precision bf16` on a CPU runs the GPU's code path, for a check);
attention is PyTorch SDPA (diffusers' default processor).

Per measurement: median and min step time over `--steps` timed steps after `--warmup` steps,
samples/s, peak memory (CUDA max allocated on a GPU, and the allocator's peak reserved; peak RSS on
a CPU), UNet and total FLOPs per step (`torch.utils.flop_counter.FlopCounterMode` on one extra,
untimed step before the warm-up, backward and checkpoint recomputation included; only on the rows
whose FLOPs differ: not on ablations that change no op, nor on the all-50 row without
checkpointing) and, on a known GPU, the UNet's model FLOPs utilisation against the card's dense
bf16 peak. Comparisons (each a ratio): the 480-token long-prompt context vs SD's
standard 77-token context; truncated backprop (5 of 50 rollout steps) vs all 50; LCM 4-step vs
UniPC 25-step sampling with CFG; the share of an align step spent in the frozen encoders; the
align step with one LoRA cost removed or one lever applied (`ALIGN_ABLATIONS`: LoRA dropout, peft's
fp32 cast of each LoRA input, the LoRA itself, channels-last, autocast), to isolate where its time
goes.

Every measurement is guarded: an out-of-memory or any other error is recorded as the result and the
run goes on; past `--deadline-s` no measurement starts (`skipped_time`). Each stage's own rows come
first, the long comparisons (all 50 steps with gradient, the align ablations) last. The JSON file
(`--out`) is rewritten after every measurement; a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/ first on the path, not the repository
    sys.path.insert(0, str(ROOT))

import torch

from longalign.loading import UserError, check_device, check_folder_path, cli_entry, error_line

STAGES = ("align", "lcm", "reward", "reward_lcm", "sample")
STAGE_CHOICES = (*STAGES, "all", "chain")
# The paper's per-GPU batch sizes (released launcher; METHOD.md §5).
PAPER_BATCH = {"align": 16, "lcm": 16, "reward": 8, "reward_lcm": 8, "sample": 4}
GIB = 2**30

# Dense (not sparse) BF16 tensor-core peak, TFLOPS, from the vendors' datasheets (NVIDIA H100,
# H200, A100, L40S, L4, A10 datasheets; the Ada Lovelace architecture whitepaper for the RTX 4090,
# BF16 with FP32 accumulate). The datasheets print the sparse figure, twice these, with an asterisk.
# Matched against torch.cuda.get_device_name() in order; the first pattern all of whose words are
# words of the name wins (so "A10" does not match an A10G or A100, nor "L4" an L40S).
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    ("H100 PCIe", "NVIDIA H100 PCIe", 756.0),
    ("H100 NVL", "NVIDIA H100 NVL", 835.0),
    ("H100", "NVIDIA H100 SXM", 989.0),
    ("H200 NVL", "NVIDIA H200 NVL", 835.0),
    ("H200", "NVIDIA H200 SXM", 989.0),
    ("GH200", "NVIDIA GH200", 989.0),
    ("A100", "NVIDIA A100", 312.0),
    ("L40S", "NVIDIA L40S", 362.0),
    ("4090", "NVIDIA GeForce RTX 4090", 165.0),
    ("L4", "NVIDIA L4", 121.0),
    ("A10", "NVIDIA A10", 125.0),
)
PEAK_SOURCE = "vendor datasheet, dense BF16 tensor core (not the sparse figure)"

# Where the time goes: profiler op names -> category (first match wins).
OP_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention", "fmha", "_softmax")),
    ("convolution", ("conv", "cudnn_convolution")),
    ("matmul", ("mm", "addmm", "bmm", "linear", "matmul", "gemm", "baddbmm")),
    ("optimizer", ("adam", "_foreach", "clip_grad")),  # before "norm": clipping's aten::_foreach_norm
    ("normalization", ("group_norm", "layer_norm", "native_group_norm", "native_layer_norm", "norm")),
    ("copy/cast", ("copy_", "to_copy", "_to_copy", "clone", "contiguous", "aten::cat")),
)

LONG_CAPTIONS = (
    (
        "A wide river valley in late autumn, seen from a stone bridge at golden hour. On the left bank, a row of "
        "tall poplars has turned bright yellow, and their long shadows stretch across a meadow where three brown "
        "horses graze beside a wooden fence. A narrow dirt road winds from the bridge toward a small village of "
        "whitewashed houses with red tile roofs; a church tower with a green copper spire rises in its centre. "
        "On the water below, a man in a blue wool cap rows a small white boat with a lantern hanging from its bow, "
        "and two swans glide in its wake. The far hills are covered in vineyards in neat diagonal rows, some leaves "
        "still green, most already rust and purple. Thin mist gathers in the hollows. In the sky, a flock of geese "
        "flies in a loose V toward the south, and a single contrail cuts across the pale blue above the clouds. "
        "In the foreground, the bridge's parapet is covered in moss and small orange lichens, and a weathered sign "
        "with carved letters points to the village. The light is warm and low, and the whole scene feels calm."
    ),
    (
        "The interior of a cluttered watchmaker's workshop at night, lit by a single brass desk lamp with a green "
        "glass shade. On the oak workbench lie dozens of tiny gears, springs and screws sorted into a tray with "
        "small compartments, a pair of tweezers, a loupe and an open pocket watch whose back shows its golden "
        "movement. An old woman with silver hair tied in a bun and round spectacles leans over the watch, holding a "
        "screwdriver no thicker than a needle. Behind her, the wall is covered with clocks of every size: a "
        "cuckoo clock carved with pine cones, a tall grandfather clock with a painted moon dial, a round station "
        "clock and several small alarm clocks in red, cream and turquoise. A tabby cat sleeps on a stack of leather "
        "books on the windowsill, and through the window a snowy street glows under yellow lamps. A kettle steams "
        "on a small iron stove in the corner. Everything is sharp and detailed, rendered like an oil painting."
    ),
)


# ----------------------------------------------------------------------------- environment
def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, GPU name and memory, OS, Python and library versions, git commit."""
    import accelerate
    import diffusers
    import peft
    import transformers

    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu_model,
        "cpu_cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "accelerate": accelerate.__version__,
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / GIB, 1)
        info["gpu_count"] = torch.cuda.device_count()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
        info["git_commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def peak_bf16_tflops(gpu_name: str) -> tuple[float | None, str | None]:
    """(dense bf16 peak TFLOPS, card label) for a CUDA device name, or (None, None) when unknown."""
    words = set(re.split(r"[^A-Z0-9]+", gpu_name.upper()))
    for pattern, label, tflops in PEAK_BF16_TFLOPS:
        if all(word in words for word in pattern.upper().split()):
            return tflops, label
    return None, None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryMeter:
    """Peak memory of a measurement: CUDA max allocated on a GPU, peak RSS (VmHWM) on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "peak_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):  # Linux: "5" resets the peak RSS of this process
                Path("/proc/self/clear_refs").write_text("5")

    def current_gib(self) -> float:
        """Memory in use now (CUDA allocated, or RSS): the baseline the peak is read against."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / GIB
        return proc_status_gib("VmRSS")

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GIB
        peak = proc_status_gib("VmHWM")
        if not math.isnan(peak):
            return peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def proc_status_gib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, in kB) in GiB; NaN where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return float("nan")


def is_oom(error: BaseException) -> bool:
    """CUDA out-of-memory (its own class, or the RuntimeError older code paths raise)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release_memory(device: torch.device) -> None:
    """Free what the last measurement left: Python garbage, the CUDA cache, glibc's free heap (CPU RSS)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)


# --------------------------------------------------------------------------------- flops
def flop_counter() -> Any:
    """A `FlopCounterMode` that also counts SDPA's CPU flash kernel (the registry covers only GPU kernels)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_flop.__wrapped__
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = sdpa_backward_flop.__wrapped__
    return FlopCounterMode(display=False, custom_mapping=mapping)


def flops_by_module(counter: Any) -> dict[str, int]:
    """Total FLOPs under each root model class seen (UNet2DConditionModel, AutoencoderKL, ...) and 'total'."""
    counts = counter.get_flop_counts()
    result = {"total": int(sum(counts.get("Global", {}).values()))}
    for name, ops in counts.items():
        if name != "Global" and "." not in name:
            result[name] = int(sum(ops.values()))
    return result


# ------------------------------------------------------------------------------- profile
def categorize(op_name: str) -> str:
    """The `OP_CATEGORIES` category of a profiler op name (`aten::cat` exactly, not `scatter`)."""
    name = op_name.lower()
    for category, needles in OP_CATEGORIES:
        if any(needle == name if needle.startswith("aten::") else needle in name for needle in needles):
            return category
    return "other (elementwise, ...)"


def profile_call(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Run `fn` once under torch.profiler; self time (device time on a GPU) by op category and the top ops.

    On a GPU the shares are of kernel time only; `kernel_seconds_total` against the unprofiled
    median step (`measure` adds `device_busy_share`) says how much of the step no kernel runs
    (launch overhead, host work, syncs), and `top_cpu_ops` where the host spends it.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    wall = time.perf_counter() - started
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    by_category: dict[str, float] = {}
    ops = []
    for event in prof.key_averages():
        micros = float(getattr(event, key, 0.0) or 0.0)
        if micros <= 0 or not event.key.startswith("aten::"):
            continue
        by_category[categorize(event.key)] = by_category.get(categorize(event.key), 0.0) + micros
        ops.append((micros, event.key))
    total = sum(by_category.values()) or 1.0
    ops.sort(reverse=True)
    cpu_ops = sorted(
        ((float(event.self_cpu_time_total), event.key) for event in prof.key_averages() if event.self_cpu_time_total > 0),
        reverse=True,
    )
    return {
        "time_kind": "CUDA kernel time" if device.type == "cuda" else "CPU self time",
        "profiled_wall_seconds": round(wall, 5),
        "kernel_seconds_total": round(total / 1e6, 5),
        "top_cpu_ops": [{"op": name, "seconds": round(us / 1e6, 5)} for us, name in cpu_ops[:8]],
        "share_by_category": {k: round(v / total, 4) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "seconds_by_category": {k: round(v / 1e6, 5) for k, v in by_category.items()},
        "top_ops": [{"op": name, "seconds": round(us / 1e6, 5), "share": round(us / total, 4)} for us, name in ops[:12]],
    }


# ------------------------------------------------------------------------------- results
class Recorder:
    """The JSON results file: a list of runs; this run's record is rewritten after every measurement."""

    def __init__(self, path: Path | None, run: dict[str, Any]):
        self.path = path
        self.run = run
        self.previous: list = []
        if path is not None:
            check_folder_path(str(path.parent), "--out")
        if path is not None and path.exists():
            try:
                loaded = json.loads(path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError):
                loaded = None
            runs = loaded if isinstance(loaded, list) else [loaded]
            if not all(isinstance(old, dict) and "results" in old for old in runs):  # ours are written whole
                raise UserError(f"--out '{path}' is not a results file of bench/run.py; name a new file or one it wrote")
            self.previous = runs

    def add(self, kind: str, record: dict[str, Any]) -> None:
        self.run[kind].append(record)
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(self.path.suffix + ".tmp")
        temporary.write_text(json.dumps([*self.previous, self.run], indent=1, default=str))
        os.replace(temporary, self.path)


@dataclass
class Options:
    """Resolved command-line options."""

    size: str
    stages: list[str]
    device: torch.device
    resolution: int
    batch_sizes: dict[str, int]
    warmup: int
    steps: int
    compare: bool
    count_flops: bool
    profile: set[str]
    fit_batch: bool
    peak_tflops: float | None
    mixed_precision: str = "no"  # "bf16" (the GPU default) or "no" (fp32, the CPU default)
    seed: int = 0
    heavy_warmup: int = 1
    heavy_steps: int = 3
    reward_steps: int = 50
    deadline: float | None = None  # time.monotonic() after which no measurement starts (--deadline-s)
    extra: dict[str, Any] = field(default_factory=dict)

    def out_of_time(self, margin_s: float = 0.0) -> bool:
        """Past the deadline, or within `margin_s` of it (for a row that takes that long)."""
        return self.deadline is not None and time.monotonic() >= self.deadline - margin_s


# ------------------------------------------------------------------------ stage contexts
class StandardSDCLIP(torch.nn.Module):
    """SD1.5's standard text conditioning for the 77-token comparison: one CLIP pass on the prompt
    truncated to 77 tokens (padding kept), last hidden state (B, 77, 768)."""

    def __init__(self, tokenizer, text_encoder):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.token_length = int(tokenizer.model_max_length)

    def forward(self, prompts, segments=None):
        """`segments` is unused: the prompt is not split."""
        from longalign.text_encoding import PromptReport

        batch = self.tokenizer(list(prompts), padding="max_length", max_length=self.token_length, truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(batch["input_ids"].to(device)).last_hidden_state
        return hidden, [PromptReport(1, 0, 0, 0) for _ in prompts]


def captions(batch_size: int, offset: int = 0) -> list[str]:
    return [LONG_CAPTIONS[(offset + index) % len(LONG_CAPTIONS)] for index in range(batch_size)]


def make_batch(
    stage: str, batch_size: int, resolution: int, seed: int, split_caption: Callable[[str], list[str]] | None = None
) -> dict[str, Any]:
    """A batch as the DataLoader gives it (`collate_examples`): long captions, their CLIP segments
    (split by `split_caption`, as the training loop's workers do) and, for align/lcm, images in [-1, 1]."""
    from longalign.data import collate_examples

    generator = torch.Generator().manual_seed(seed)
    items = []
    for index, caption in enumerate(captions(batch_size, seed)):
        item: dict[str, Any] = {"caption": caption, "index": index}
        if stage in ("align", "lcm"):
            item["pixel_values"] = torch.rand(3, resolution, resolution, generator=generator) * 2 - 1
        items.append(item)
    return collate_examples(items, resolution, split_caption)


class StageBench:
    """One stage's parts, loaded by the stage's own path, prepared as `run_training` prepares them."""

    def __init__(self, stage: str, folders: dict[str, Path], options: Options, workdir: Path):
        from longalign.config import (
            AlignArguments,
            LcmArguments,
            ModelArguments,
            RewardArguments,
        )
        from longalign.training import make_accelerator, prepare_optimization

        self.stage = stage
        self.options = options
        device = options.device
        common = {
            "output_dir": str(workdir / f"run-{stage}"),
            "mixed_precision": options.mixed_precision,
            "report_to": "none",
            "cpu": device.type != "cuda",
            "resolution": options.resolution,
            "train_batch_size": options.batch_sizes[stage],
            "gradient_accumulation_steps": 1,
            "dataloader_num_workers": 0,
            "seed": options.seed,
        }
        self.model_args = ModelArguments(
            pretrained_model=str(folders["sd15"]), t5_model=str(folders["t5"]), adapter=str(folders["adapter"])
        )
        if stage == "align":
            args = AlignArguments(**common)
        elif stage == "lcm":
            args = LcmArguments(**common)
        else:
            args = RewardArguments(
                **common, reward_model=str(folders["preference"]), rollout="ddim_cfg" if stage == "reward" else "lcm",
                **rollout_flags(options.reward_steps),
            )
        self.args = args
        started = time.perf_counter()
        self.accelerator = make_accelerator(args)
        script = {"align": "train_align", "lcm": "train_lcm"}.get(stage, "train_reward")
        self.stage_spec = importlib.import_module(script).build_stage(self.model_args, args, self.accelerator)
        self.parts = self.stage_spec.parts
        self.split_caption = self.parts.encoder.splitter()  # as run_training's DataLoader
        self.params, self.optimizer, self.lr_scheduler = prepare_optimization(self.accelerator, args, self.stage_spec)
        synchronize(device)
        self.load_seconds = time.perf_counter() - started

    def step(self, batch: dict[str, Any], seed: int) -> float | None:
        """One micro-step of `run_training`, by its own `micro_step`: loss, finite check on every rank,
        backward, gradient clipping, AdamW and LR steps, zero grads."""
        from longalign.training import micro_step

        torch.manual_seed(seed)  # LoRA / adapter dropout
        generator = torch.Generator().manual_seed(seed)
        done = micro_step(self.accelerator, self.args, self.stage_spec, batch, generator, True, self.params, self.optimizer, self.lr_scheduler)
        return done.loss

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.free_memory()
        self.stage_spec = self.parts = self.optimizer = self.params = self.lr_scheduler = None
        release_memory(self.options.device)


RECOMPUTED = "FLOPs include the recomputed forward of each checkpointed UNet call: MFU here is hardware FLOPs utilisation"
LONG_ROW_S = 150  # about how long the checkpointed all-50 row takes on an H200 (FLOP-counted step + 3 steps)
LATER_COMPARISONS = {"reward": "gradient through all rollout steps", "align": "align ablations"}  # in this order

# Comparison 5: the align step with one cost removed or one lever applied, to isolate where its time
# goes (BENCHMARKS.md: on an H200, half the kernel time was elementwise work and casts).
ALIGN_ABLATIONS = {
    "no_lora_dropout": "LoRA dropout replaced by identity",
    "no_lora_input_cast": "peft's cast of each LoRA input to the fp32 LoRA weights' dtype disabled",
    "lora_lean": "LoRA dropout off and LoRA input cast disabled",
    "no_lora": "UNet LoRA disabled (the adapter still trains through the UNet's backward)",
    "channels_last": "UNet in channels-last memory format (+ cudnn.benchmark on a GPU)",
    "no_autocast": "UNet without accelerate's autocast: frozen path pure bf16 (norms, SiLU in bf16, not fp32), LoRA fp32 via peft's casts",
}
ABLATIONS_CHANGING_FLOPS = {"no_lora"}  # the others change how the same ops run, not which ops


def ablation_missing(unet: torch.nn.Module, kind: str) -> str | None:
    """Why `kind` cannot apply to this UNet (None if it can): `no_autocast` needs accelerate's wrapper."""
    if kind == "no_autocast" and "_original_forward" not in vars(unet):
        return "the UNet runs without autocast here (mixed precision 'no')"
    return None


@contextlib.contextmanager
def align_ablation(unet: torch.nn.Module, kind: str) -> Any:
    """Apply one of `ALIGN_ABLATIONS` to a peft-LoRA UNet for the block; restore it after.

    The LoRA parameters stay the same objects (the optimizer keeps them) and their
    `requires_grad` flags are restored, so the reference step runs unchanged afterwards.
    """
    from peft.helpers import disable_input_dtype_casting
    from peft.tuners.lora import LoraLayer

    if kind not in ALIGN_ABLATIONS:
        raise ValueError(f"unknown align ablation '{kind}'")
    missing = ablation_missing(unet, kind)
    if missing:
        raise ValueError(f"align ablation '{kind}' does not apply: {missing}")
    lora_layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    with contextlib.ExitStack() as stack:
        if kind in ("no_lora_dropout", "lora_lean"):  # the dropout on each LoRA branch's output (longalign.lora)
            saved = [(up, up.branch_dropout) for up in unet.modules() if hasattr(up, "branch_dropout")]
            for up, _ in saved:
                up.branch_dropout = torch.nn.Identity()

            def restore_dropout() -> None:
                for up, dropout in saved:
                    up.branch_dropout = dropout

            stack.callback(restore_dropout)
        if kind in ("no_lora_input_cast", "lora_lean"):
            stack.enter_context(disable_input_dtype_casting(unet))
        if kind == "no_lora":
            trainable = {p: p.requires_grad for p in unet.parameters()}
            for layer in lora_layers:
                layer.enable_adapters(False)

            def restore_adapters() -> None:
                for layer in lora_layers:
                    layer.enable_adapters(True)
                for param, flag in trainable.items():
                    param.requires_grad_(flag)

            stack.callback(restore_adapters)
        if kind == "channels_last":
            unet.to(memory_format=torch.channels_last)
            stack.callback(lambda: unet.to(memory_format=torch.contiguous_format))
            previous = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
            stack.callback(lambda: setattr(torch.backends.cudnn, "benchmark", previous))
        if kind == "no_autocast":  # accelerate keeps the unwrapped forward beside the autocast one
            wrapped = vars(unet)["forward"]
            unet.forward = vars(unet)["_original_forward"]
            stack.callback(setattr, unet, "forward", wrapped)
        yield


def rollout_flags(steps: int) -> dict[str, int]:
    """The reward stages' rollout flags: the released rollout (50 DDIM steps, grad through 5 with
    stride 10), or a shorter one for smoke runs (`--reward-steps`, e.g. 10: grad through 5, stride 2)."""
    grad_steps = min(5, steps)
    return {"rollout_steps": steps, "grad_steps": grad_steps, "grad_stride": max(steps // grad_steps, 1)}


# --------------------------------------------------------------------------- measurement
def measure(
    name: str,
    run_step: Callable[[int], Any],
    samples_per_step: int,
    warmup: int,
    steps: int,
    options: Options,
    profile: bool = False,
) -> dict[str, Any]:
    """Count FLOPs on one untimed step, warm up `warmup` plain steps, time `steps` steps, read the peak memory.

    The FLOP-counted step is not a warm-up step: the counter slows it several times over (it runs
    on the CPU), so a stage with one warm-up step still gets a plain one before the timed steps.
    """
    device = options.device
    meter = MemoryMeter(device)
    record: dict[str, Any] = {"warmup": warmup, "steps": steps, "samples_per_step": samples_per_step, "memory_kind": meter.kind}
    meter.reset()
    flops: dict[str, int] | None = None
    if options.count_flops:
        with flop_counter() as counter:
            run_step(options.seed + 20_000)
        flops = flops_by_module(counter)
    for index in range(warmup):
        run_step(options.seed + 10_000 + index)
    synchronize(device)
    meter.reset()  # steady state: the peak of the timed steps (optimizer state already allocated)
    baseline = meter.current_gib()
    times = []
    for index in range(steps):
        synchronize(device)
        started = time.perf_counter()
        run_step(options.seed + index)
        synchronize(device)
        times.append(time.perf_counter() - started)
    record.update(
        status="ok",
        step_time_median_s=round(statistics.median(times), 6),
        step_time_min_s=round(min(times), 6),
        step_times_s=[round(t, 6) for t in times],
        samples_per_s=round(samples_per_step / statistics.median(times), 4),
        peak_memory_gib=round(meter.peak_gib(), 3),
        memory_baseline_gib=round(baseline, 3),
    )
    if device.type == "cuda":  # what a smaller card must hold: the caching allocator's peak, not only live tensors
        record["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GIB, 3)
    if flops is not None:
        unet = flops.get("UNet2DConditionModel", 0)
        record.update(unet_flops_per_step=unet, total_flops_per_step=flops["total"], flops_by_model=flops)
        record["unet_tflops_per_s"] = round(unet / record["step_time_median_s"] / 1e12, 3)
        if options.peak_tflops:
            record["mfu_unet"] = round(unet / record["step_time_median_s"] / (options.peak_tflops * 1e12), 4)
            record["mfu_total"] = round(flops["total"] / record["step_time_median_s"] / (options.peak_tflops * 1e12), 4)
    if profile:
        try:
            record["profile"] = profile_call(lambda: run_step(options.seed + 30_000), device)
            if device.type == "cuda":  # the rest of the unprofiled step runs no kernel
                record["device_busy_share"] = round(record["profile"]["kernel_seconds_total"] / record["step_time_median_s"], 4)
        except Exception as error:  # noqa: BLE001 - a profiler failure must not lose the measurement
            record["profile"] = {"error": f"{type(error).__name__}: {error}"}
    return record


def guarded(name: str, body: Callable[[], dict[str, Any]], options: Options, takes_s: float = 0.0) -> dict[str, Any]:
    """Run a measurement; an OOM or any other error becomes the result instead of a crash. Past
    `--deadline-s`, or within `takes_s` (about how long the row runs) of it, the measurement is not
    started and `skipped_time` is the result."""
    if options.out_of_time(takes_s):
        print(f"  {name}: skipped: past --deadline-s", flush=True)
        return {"status": "skipped_time", "note": "not started: past --deadline-s"}
    try:
        return body()
    except Exception as error:  # noqa: BLE001 - every failure is a result here
        status = "oom" if is_oom(error) else "error"
        record = {"status": status, "error": f"{type(error).__name__}: {error_line(error) if str(error).strip() else ''}"}
        if options.device.type == "cuda":
            record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(options.device) / GIB, 3)
            record["memory_kind"] = "cuda_max_allocated"
        if status == "error":
            record["traceback"] = traceback.format_exc(limit=6)[-2000:]
        print(f"  {name}: {status}: {record['error']}", flush=True)
        return record
    finally:
        release_memory(options.device)


class Runner:
    """Runs the measurements of the chosen stages and records them."""

    def __init__(self, options: Options, folders: dict[str, Path], recorder: Recorder, workdir: Path):
        self.options = options
        self.folders = folders
        self.recorder = recorder
        self.workdir = workdir
        self.results: dict[str, dict[str, Any]] = {}
        self.later: list[tuple[str, str, int, int, int]] = []  # (stage, reference, batch, warmup, steps)

    # ------------------------------------------------------------------ bookkeeping
    def base(self, name: str, stage: str, variant: str, batch_size: int) -> dict[str, Any]:
        options = self.options
        return {
            "name": name, "stage": stage, "variant": variant, "size": options.size, "device": options.device.type,
            "resolution": options.resolution, "batch_size": batch_size,
            "precision": "bf16 (accelerate autocast, frozen weights bf16, LoRA fp32)" if options.mixed_precision == "bf16" else "fp32",
            "attention": "sdpa", "peak_tflops": options.peak_tflops,
        } | ({"flops_note": RECOMPUTED} if stage in ("reward", "reward_lcm") else {})  # fmt: skip

    def record(self, record: dict[str, Any]) -> dict[str, Any]:
        self.results[record["name"]] = record
        self.recorder.add("results", record)
        print(summary_line(record), flush=True)
        return record

    def compare(
        self, name: str, what: str, numerator: str, denominator: str, key: str = "step_time_median_s",
        denominator_key: str | None = None,
    ) -> None:  # fmt: skip
        """Record `numerator[key] / denominator[denominator_key or key]` as comparison `name`."""
        a, b = self.results.get(numerator, {}), self.results.get(denominator, {})
        b_key = denominator_key or key
        record: dict[str, Any] = {"name": name, "what": what, "numerator": numerator, "denominator": denominator, "quantity": key}
        if a.get("status") == "ok" and b.get("status") == "ok" and b.get(b_key):
            record["ratio"] = round(a[key] / b[b_key], 4)
        else:
            record["ratio"] = None
            record["note"] = f"{numerator}: {a.get('status', 'not run')}, {denominator}: {b.get('status', 'not run')}"
        self.recorder.add("comparisons", record)

    # ------------------------------------------------------------------ train stages
    def train_stage(self, stage: str) -> None:
        options = self.options
        batch_size = options.batch_sizes[stage]
        heavy = stage in ("reward", "reward_lcm")
        warmup = min(options.warmup, options.heavy_warmup) if heavy else options.warmup
        steps = min(options.steps, options.heavy_steps) if heavy else options.steps
        sizes = [batch_size]
        if options.fit_batch:
            sizes += [b for b in (batch_size // 2, batch_size // 4, batch_size // 8, 1) if 0 < b < batch_size]
        sizes = list(dict.fromkeys(sizes))
        for attempt, size in enumerate(sizes):
            name = stage if attempt == 0 else f"{stage}_bs{size}"
            role = "paper batch" if attempt == 0 else "memory-fitting batch"
            record = self.base(name, stage, f"{self.describe(stage)}; {role}", size)
            bench: list[StageBench] = []

            def body(size: int = size, name: str = name, bench: list[StageBench] = bench) -> dict[str, Any]:
                self.options.batch_sizes = {**self.options.batch_sizes, stage: size}
                bench.append(StageBench(stage, self.folders, options, self.workdir))
                stage_bench = bench[0]
                batch = make_batch(stage, size, options.resolution, options.seed, stage_bench.split_caption)
                result = measure(name, lambda seed: stage_bench.step(batch, seed), size, warmup, steps, options, stage in options.profile)
                result["load_seconds"] = round(bench[0].load_seconds, 2)
                result["unet_attention_processor"] = sorted(
                    {type(p).__name__ for p in bench[0].accelerator.unwrap_model(bench[0].parts.unet).attn_processors.values()}
                )
                return result

            record.update(guarded(name, body, options))
            self.record(record)
            if record["status"] == "ok" and options.compare:
                self.stage_comparisons(stage, name, bench[0], size, warmup, steps)
                if stage in LATER_COMPARISONS:
                    self.later.append((stage, name, size, warmup, steps))
            if bench:
                bench[0].close()
            bench.clear()
            self.options.batch_sizes = {**self.options.batch_sizes, stage: batch_size}
            if record["status"] != "oom":
                break

    def describe(self, stage: str) -> str:
        n = self.options.reward_steps
        return {
            "align": "align step: 480-token context (segment CLIP 240 + adapter(T5-large) 240), UNet LoRA + adapter train",
            "lcm": "lcm step: student fwd+bwd, teacher cond+uncond fwd, target fwd (480-token context)",
            "reward": f"reward step: DDIM {n} steps, CFG 7.5, grad through 5 of {n} (checkpointed), VAE decode, preference score",
            "reward_lcm": "reward_lcm step: LCM 4 steps, all with grad (checkpointed), VAE decode, preference score",
        }[stage]

    def stage_comparisons(self, stage: str, name: str, bench: StageBench, size: int, warmup: int, steps: int) -> None:
        """The comparisons the issue asks for that reuse the stage's loaded parts: 1 and 4 (align)."""
        if stage == "align":
            self.align_context77(bench, name, size, warmup, steps)
            self.encoder_shares(bench, name, size, steps)

    def later_comparisons(self) -> None:
        """The long comparisons, after every stage's own rows so that a time limit cuts them first:
        2 (reward, all 50 steps with gradient, minutes on a GPU) and 5 (align ablations). Each
        reloads its stage at the batch size its row ran with."""
        options = self.options
        priority = list(LATER_COMPARISONS)
        for stage, reference, size, warmup, steps in sorted(self.later, key=lambda item: priority.index(item[0])):
            print(f"[{stage}: {LATER_COMPARISONS[stage]}]", flush=True)
            if options.out_of_time(LONG_ROW_S if stage == "reward" else 0.0):
                note = f"{LATER_COMPARISONS[stage]} not started: past --deadline-s"
                self.recorder.add("comparisons", {"name": f"{reference}_later", "status": "skipped_time", "note": note})
                print(f"  {note}", flush=True)
                continue
            full_size = options.batch_sizes[stage]
            options.batch_sizes = {**options.batch_sizes, stage: size}
            bench: StageBench | None = None
            try:
                bench = StageBench(stage, self.folders, options, self.workdir)
            except Exception as error:  # noqa: BLE001 - as `guarded`: the failure is the result
                status = "oom" if is_oom(error) else "error"
                self.recorder.add("comparisons", {"name": f"{reference}_later", "status": status, "error": f"reloading {stage}: {error}"[:300]})
                release_memory(options.device)
                continue
            try:
                if stage == "align":
                    self.align_ablations(bench, reference, size, warmup, steps)
                else:
                    self.reward_all_steps(bench, reference, size, steps)
            finally:
                if bench is not None:
                    bench.close()
                options.batch_sizes = {**options.batch_sizes, stage: full_size}

    def align_context77(self, bench: StageBench, reference: str, size: int, warmup: int, steps: int) -> None:
        """Comparison 1: the same align step with SD's standard 77-token CLIP context (no T5, no adapter)."""
        from longalign.text_encoding import LongPromptEncoder

        options = self.options
        name = f"{reference}_ctx77"
        record = self.base(name, "align", "align step with SD's standard 77-token context (one CLIP pass, no T5/adapter)", size)
        original = bench.parts.encoder
        clip = original.clip

        def body() -> dict[str, Any]:
            bench.parts.encoder = LongPromptEncoder(StandardSDCLIP(clip.tokenizer, clip.text_encoder), None, None, mode="clip")
            batch = make_batch("align", size, options.resolution, options.seed)
            return measure(name, lambda seed: bench.step(batch, seed), size, max(warmup, 1), steps, options)

        try:
            record.update(guarded(name, body, options))
        finally:
            bench.parts.encoder = original
        self.record(record)
        self.compare("context_480_vs_77", "align step time, 480-token long-prompt context / SD's 77-token context", reference, name)
        self.compare("context_480_vs_77_unet_flops", "UNet FLOPs per align step, 480 / 77 tokens", reference, name, "unet_flops_per_step")

    def align_ablations(self, bench: StageBench, reference: str, size: int, warmup: int, steps: int) -> None:
        """Comparison 5: the align step with one LoRA cost removed or one lever applied (`ALIGN_ABLATIONS`)."""
        options = self.options
        unet = bench.accelerator.unwrap_model(bench.parts.unet)
        batch = make_batch("align", size, options.resolution, options.seed, bench.split_caption)
        for kind, label in ALIGN_ABLATIONS.items():
            name = f"{reference}_{kind}"
            record = self.base(name, "align", f"align step, {label}", size)
            missing = ablation_missing(unet, kind)
            if missing:
                record.update(status="not_applicable", note=missing)
                self.record(record)
                continue

            def body(kind: str = kind, name: str = name) -> dict[str, Any]:
                # The step as trained is timed again just before each ablation, so a drift of the
                # card's clocks or caches over the run does not pass for the ablation's effect.
                step = lambda seed: bench.step(batch, seed)  # noqa: E731
                plain = measure(name, step, size, max(warmup, 1), steps, dataclasses.replace(options, count_flops=False))
                with align_ablation(unet, kind):  # FLOPs counted only where the ablation changes them
                    counted = dataclasses.replace(options, count_flops=options.count_flops and kind in ABLATIONS_CHANGING_FLOPS)
                    measured = measure(name, step, size, max(warmup, 1), steps, counted)
                return measured | {"reference_step_time_median_s": plain["step_time_median_s"]}

            record.update(guarded(name, body, options))
            bench.optimizer.zero_grad(set_to_none=True)
            self.record(record)
            self.compare(
                f"align_{kind}_vs_align", f"align step time, {label} / as trained (timed just before it)",
                name, name, denominator_key="reference_step_time_median_s",
            )  # fmt: skip

    def encoder_shares(self, bench: StageBench, reference: str, size: int, steps: int) -> None:
        """Comparison 4: time of the frozen encoders (VAE encode, segment CLIP, T5-large) per align batch."""
        from longalign.training import encode_images

        options = self.options
        device = options.device
        batch = make_batch("align", size, options.resolution, options.seed, bench.split_caption)
        encoder = bench.parts.encoder
        parts = {
            "vae_encode": lambda: encode_images(bench.parts.vae, batch["pixel_values"], torch.Generator().manual_seed(0)),
            "segment_clip": lambda: encoder.clip(batch["caption"], batch["segments"]),  # split by the DataLoader
            "t5_large": lambda: encoder.t5(batch["caption"]),
        }
        record: dict[str, Any] = {"name": f"{reference}_frozen_encoders", "what": "share of the align step spent in the frozen encoders (the case for caching them)"}

        def body() -> dict[str, Any]:
            seconds = {}
            with torch.no_grad():
                for key, fn in parts.items():
                    fn()  # warm-up
                    times = []
                    for _ in range(max(steps, 1)):
                        synchronize(device)
                        started = time.perf_counter()
                        fn()
                        synchronize(device)
                        times.append(time.perf_counter() - started)
                    seconds[key] = round(statistics.median(times), 6)
            step = self.results.get(reference, {}).get("step_time_median_s")
            result: dict[str, Any] = {"status": "ok", "seconds": seconds, "align_step_s": step}
            if step:
                result["share"] = {key: round(value / step, 4) for key, value in seconds.items()}
                result["share"]["total"] = round(sum(seconds.values()) / step, 4)
                result["ratio"] = result["share"]["total"]
            return result

        record.update(guarded(record["name"], body, options))
        self.recorder.add("comparisons", record)

    def reward_all_steps(self, bench: StageBench, reference: str, size: int, steps: int) -> None:
        """Comparison 2: gradient through all 50 rollout steps (checkpointed, then not) vs the released 5 of 50."""
        from longalign.diffusion import RolloutSettings

        options = self.options
        original = bench.stage_spec.loss_fn
        for suffix, checkpointing, label in (
            ("all50", True, f"reward step with grad through all {options.reward_steps} steps (each UNet call checkpointed)"),
            ("all50_nockpt", False, f"reward step with grad through all {options.reward_steps} steps, no checkpointing"),
        ):
            name = f"{reference}_{suffix}"
            record = self.base(name, "reward", label, size)

            def body(checkpointing: bool = checkpointing, name: str = name) -> dict[str, Any]:
                settings = RolloutSettings(
                    **rollout_flags(options.reward_steps), guidance_scale=bench.args.guidance_scale, grad_all_steps=True,
                    checkpoint_grad_steps=checkpointing,
                )  # fmt: skip
                bench.stage_spec.loss_fn = functools.partial(original, settings=settings)  # the stage's loss, this rollout
                batch = make_batch("reward", size, options.resolution, options.seed, bench.split_caption)
                # FLOPs of the checkpointed row only: counting costs a minute of CPU here, and the other runs out of memory
                counted = dataclasses.replace(options, count_flops=options.count_flops and checkpointing)
                return measure(name, lambda seed: bench.step(batch, seed), size, 1, min(steps, 2), counted)

            try:
                record.update(guarded(name, body, options, LONG_ROW_S if checkpointing else 0.0))
            finally:
                bench.stage_spec.loss_fn = original
                bench.optimizer.zero_grad(set_to_none=True)
                release_memory(options.device)
            self.record(record)
            released = f"released 5 of {options.reward_steps}"
            self.compare(f"reward_{suffix}_vs_5of50", f"reward step time, {label} / {released}", name, reference)
            self.compare(f"reward_{suffix}_vs_5of50_memory", f"peak memory, {label} / {released}", name, reference, "peak_memory_gib")

    # ------------------------------------------------------------------ sampling
    def sample_stage(self) -> None:
        """Comparison 3: LongPromptPipeline, LCM 4 steps (guidance 0) vs UniPC 25 steps with CFG 7.5."""
        from longalign.pipeline import LongPromptPipeline

        options = self.options
        device = options.device
        size = options.batch_sizes["sample"]
        dtype = torch.bfloat16 if options.mixed_precision == "bf16" else torch.float32
        holder: list[LongPromptPipeline] = []

        def load() -> None:
            holder.append(
                LongPromptPipeline.from_pretrained(
                    str(self.folders["sd15"]), str(self.folders["t5"]), str(self.folders["adapter"]), device=str(device), dtype=dtype
                )
            )

        for name, sampler, steps_, guidance in (("sample_lcm4", "lcm", 4, 0.0), ("sample_unipc25_cfg", "unipc", 25, 7.5)):
            record = self.base(name, "sample", f"LongPromptPipeline, {sampler} {steps_} steps, guidance {guidance}, VAE decode", size)
            record["precision"] = str(dtype).replace("torch.", "") + " weights"

            def body(sampler: str = sampler, steps_: int = steps_, guidance: float = guidance, name: str = name) -> dict[str, Any]:
                if not holder:
                    load()
                pipeline = holder[0]
                pipeline.set_sampler(sampler)
                prompts = captions(size)
                resolution = options.resolution

                def call(seed: int) -> None:
                    generator = torch.Generator().manual_seed(seed)
                    pipeline(prompts, steps=steps_, guidance_scale=guidance, height=resolution, width=resolution,
                             generator=generator, show_progress=False)  # fmt: skip

                return measure(name, call, size, max(options.warmup, 1) if options.warmup else 0, options.steps, options, "sample" in options.profile)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # random weights decode to NaN-free noise, but PIL casts warn
                record.update(guarded(name, body, options))
            self.record(record)
        holder.clear()
        release_memory(device)
        self.compare("sample_unipc25_vs_lcm4", "time per batch, UniPC 25 steps + CFG / LCM 4 steps", "sample_unipc25_cfg", "sample_lcm4")

    # ------------------------------------------------------------------ chain
    def chain(self) -> None:
        """The tiny align -> lcm -> reward -> reward_lcm chain through run_unet.sh, 2 optimizer steps
        each. A stage still running at `--deadline-s` is stopped (`timeout`); an error before the
        stages (writing the data) is the row's result, as in `guarded`."""
        record = self.base("chain", "chain", "run_unet.sh align -> lcm -> reward -> reward_lcm, 2 optimizer steps each, batch 2, end-to-end wall time incl. imports, loading, checkpoints, validation", 2)
        record.update(guarded("chain", self._run_chain, self.options), target_seconds=60)
        self.record(record)

    def _run_chain(self) -> dict[str, Any]:
        from longalign.data import write_tiny_dataset

        options = self.options
        data = write_tiny_dataset(self.workdir / "data", n=4, resolution=options.resolution)
        cwd = self.workdir / "chain"
        cwd.mkdir(exist_ok=True)
        flags = [
            "--pretrained_model", str(self.folders["sd15"]), "--t5_model", str(self.folders["t5"]),
            "--dataset", str(data), "--resolution", str(options.resolution), "--train_batch_size", "2",
            "--max_train_steps", "2", "--mixed_precision", "no", "--dataloader_num_workers", "0",
            "--report_to", "none", "--validation_steps", "0", "--overwrite",
        ]  # fmt: skip
        reward = ["--reward_model", str(self.folders["preference"])]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable, "NUM_GPUS": "0"}
        if options.device.type != "cuda":
            env["CUDA_VISIBLE_DEVICES"] = ""
        if options.extra.get("threads"):
            env["OMP_NUM_THREADS"] = str(options.extra["threads"])  # the scripts' torch threads, as --threads here
        per_stage: dict[str, Any] = {}
        status = "ok"
        for stage, extra in (("align", ["--adapter", str(self.folders["adapter"])]), ("lcm", []), ("reward", reward), ("reward_lcm", reward)):
            started = time.perf_counter()
            left = None if options.deadline is None else max(options.deadline - time.monotonic(), 1.0)
            with subprocess.Popen(
                ["bash", str(ROOT / "run_unet.sh"), stage, "bench", *flags, *extra],
                cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            ) as process:  # fmt: skip
                try:
                    output, _ = process.communicate(timeout=left)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)  # the launcher and the python it started
                    output, _ = process.communicate()
                    status = "timeout"
            per_stage[stage] = round(time.perf_counter() - started, 2)
            if status == "ok" and process.returncode != 0:
                status = "error"
                per_stage[f"{stage}_error"] = output[-1500:]
            if status != "ok":
                break
        total = sum(v for v in per_stage.values() if isinstance(v, float))
        return {"status": status, "wall_seconds_total": round(total, 2), "wall_seconds_by_stage": per_stage}


# ---------------------------------------------------------------------------- reporting
def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def summary_line(record: dict[str, Any]) -> str:
    if record.get("status") != "ok":
        return f"  {record['name']}: {record.get('status')} {record.get('error', record.get('note', ''))}"
    if "wall_seconds_total" in record:
        return f"  {record['name']}: {record['wall_seconds_total']} s total {record['wall_seconds_by_stage']}"
    return (
        f"  {record['name']}: median {record['step_time_median_s']:.4f} s, min {record['step_time_min_s']:.4f} s, "
        f"{record['samples_per_s']:.3g} samples/s, peak {record['peak_memory_gib']:.2f} GiB"
        + (f", UNet {record['unet_flops_per_step'] / 1e12:.3g} TFLOP/step" if "unet_flops_per_step" in record else "")
        + (f", MFU {record['mfu_unet']:.1%}" if "mfu_unet" in record else "")
    )


def markdown(run: dict[str, Any]) -> str:
    """The run's results and comparisons as markdown tables."""
    lines = [
        "| measurement | batch | px | median s | min s | samples/s | peak GiB | UNet TFLOP/step | UNet TFLOP/s | MFU (UNet) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in run["results"]:
        if "wall_seconds_total" in r:
            lines.append(f"| {r['name']} | {r['batch_size']} | {r['resolution']} | {fmt(r.get('wall_seconds_total'))} (total wall) | - | - | - | - | - | - | {r['status']} |")
            continue
        unet = r.get("unet_flops_per_step")
        mfu = r.get("mfu_unet")
        lines.append(
            f"| {r['name']} | {r['batch_size']} | {r['resolution']} | {fmt(r.get('step_time_median_s'))} | {fmt(r.get('step_time_min_s'))} "
            f"| {fmt(r.get('samples_per_s'))} | {fmt(r.get('peak_memory_gib'))} | {fmt(unet / 1e12 if unet else None)} "
            f"| {fmt(r.get('unet_tflops_per_s'))} | {f'{mfu:.1%}' if mfu is not None else '-'} | {r['status']} |"
        )
    if run["comparisons"]:
        lines += ["", "| comparison | ratio | detail |", "|---|---|---|"]
        for c in run["comparisons"]:
            detail = c.get("what", "")
            if "share" in c:
                detail += ": " + ", ".join(f"{k} {v:.1%}" for k, v in c["share"].items())
            elif c.get("note"):
                detail += f" ({c['note']})"
            elif c.get("status") not in (None, "ok"):
                detail += f" ({c.get('status')}: {c.get('error', '')})"
            lines.append(f"| {c['name']} | {fmt(c.get('ratio'))} | {detail} |")
    if any("flops_note" in r and "mfu_unet" in r for r in run["results"]):
        lines += ["", f"MFU of the reward rows: {RECOMPUTED}."]
    profiles = [(r["name"], r["profile"]) for r in run["results"] if isinstance(r.get("profile"), dict) and "share_by_category" in r["profile"]]
    for name, prof in profiles:
        shares = ", ".join(f"{k} {v:.1%}" for k, v in prof["share_by_category"].items())
        lines += ["", f"Where the time goes in `{name}` ({prof['time_kind']}): {shares}"]
        busy = next((r.get("device_busy_share") for r in run["results"] if r["name"] == name), None)
        if busy is not None:
            lines.append(f"Kernels run {busy:.0%} of the unprofiled median step; the rest is host work, launches and syncs.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- main
def parse_options(argv: list[str] | None) -> tuple[Options | None, argparse.Namespace]:
    """The command line as `Options` (None with --table: nothing is measured, nor CUDA probed)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny", help="tiny models or full SD1.5-size random-weight models")
    parser.add_argument("--stage", choices=STAGE_CHOICES, default="all", help="a stage, all of them (with comparisons), or the tiny script chain")
    parser.add_argument("--gpu-table", action="store_true", help="the GPU table: sd15, 512 px, paper batch sizes with a memory-fitting fallback, profile of align")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: 512 for sd15 on a GPU, else 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="one batch size for every stage (default: paper sizes on a GPU, else 1 for sd15 / 2 for tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 on a GPU, 3 on a CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 3 on a GPU, 1 on a CPU)")
    parser.add_argument("--no-compare", action="store_true", help="skip the comparisons (77-token context, all-50 backprop, encoder shares, align ablations)")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    parser.add_argument("--profile", nargs="*", default=None, help="profile one extra step of these stages (no names: all)")
    parser.add_argument("--fit-batch", action="store_true", help="on OOM, retry with halved batch sizes (on by default with --gpu-table)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--models", default=None, help="folder for the model files (reused when it holds this size); default: a temporary folder")
    parser.add_argument("--out", default="bench/results.json", help="JSON file the run is appended to ('' for none)")
    parser.add_argument("--reward-steps", type=int, default=50, help="DDIM steps of the reward rollout (50 = released; fewer only for smoke runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 is steadier on a busy shared CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision", choices=("bf16", "no"), default=None,
        help="mixed precision (default: bf16 on a GPU, fp32 on a CPU; bf16 on a CPU checks the GPU's code path, slowly)",
    )  # fmt: skip
    parser.add_argument("--table", default=None, metavar="FILE", help="only print the tables of the last run in FILE (e.g. one a time limit cut off)")
    parser.add_argument("--deadline-s", type=float, default=None, help="start no measurement after this many seconds (later rows: skipped_time)")
    ns = parser.parse_args(argv)
    if ns.table:
        return None, ns

    if ns.threads is not None:
        if ns.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(ns.threads)
    device = torch.device(check_device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if ns.models:
        from bench.models import models_ready

        check_folder_path(ns.models, "--models", writable=not models_ready(ns.size, ns.models))  # written models are only read
    gpu = device.type == "cuda"
    if ns.gpu_table:
        if ns.size != "sd15":
            parser.error("--gpu-table measures the SD1.5-size models: add --size sd15")
        if not gpu:
            parser.error("--gpu-table needs a CUDA device")
    stages = list(STAGES) if ns.stage == "all" else [ns.stage]
    if "chain" in stages and ns.size != "tiny":
        parser.error("--stage chain runs the tiny models only (--size tiny)")
    resolution = ns.resolution or (512 if ns.size == "sd15" and gpu else 64)
    if resolution % 8 or resolution < 8:
        parser.error("--resolution must be a positive multiple of 8")
    if ns.batch_size is not None and ns.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if ns.batch_size is not None:
        batch_sizes = {stage: ns.batch_size for stage in STAGES}
    elif gpu and ns.size == "sd15":
        batch_sizes = dict(PAPER_BATCH)
    else:
        batch_sizes = {stage: 1 if ns.size == "sd15" else 2 for stage in STAGES}
    warmup = ns.warmup if ns.warmup is not None else (3 if gpu else 1)
    steps = ns.steps if ns.steps is not None else (5 if gpu else 3)
    if steps < 1 or warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if ns.reward_steps < 1 or 1000 % ns.reward_steps:
        parser.error("--reward-steps must divide 1000 (e.g. 50, 25, 10)")
    profile: set[str] = set()
    if ns.profile is not None:
        profile = set(ns.profile or STAGES)
    elif ns.gpu_table:
        profile = {"align"}
    peak, label = (None, None)
    if gpu:
        peak, label = peak_bf16_tflops(torch.cuda.get_device_name(device))
    if ns.peak_tflops:
        peak, label = ns.peak_tflops, "--peak-tflops"
    options = Options(
        size=ns.size, stages=stages, device=device, resolution=resolution, batch_sizes=batch_sizes, warmup=warmup,
        steps=steps, compare=not ns.no_compare, count_flops=not ns.no_flops, profile=profile,
        fit_batch=ns.fit_batch or ns.gpu_table, peak_tflops=peak, seed=ns.seed,
        mixed_precision=ns.precision or ("bf16" if gpu else "no"),
        heavy_warmup=1 if gpu else warmup, heavy_steps=3 if gpu else steps, reward_steps=ns.reward_steps,
        deadline=None if ns.deadline_s is None else time.monotonic() + ns.deadline_s,
        extra={"peak_label": label, "threads": ns.threads},
    )  # fmt: skip
    return options, ns


def print_tables(path: str) -> int:
    """Print the markdown tables of the last run recorded in the results JSON at `path`."""
    try:
        runs = json.loads(Path(path).read_text())
        run = runs[-1]
        print(markdown(run))
    except (OSError, ValueError, IndexError, KeyError, TypeError) as error:
        raise SystemExit(f"error: --table '{path}' holds no bench/run.py results ({type(error).__name__}: {error})") from None
    return 0


@cli_entry
def main(argv: list[str] | None = None) -> int:
    options, ns = parse_options(argv)
    if options is None:
        return print_tables(ns.table)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.ERROR)
    for name in ("transformers", "diffusers", "accelerate", "longalign"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*common direction from a global batch of one prompt.*")
    from bench.models import ensure_models

    started = time.perf_counter()
    run: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "size": options.size,
        "machine": machine_info(options.device),
        "settings": {
            "device": str(options.device), "resolution": options.resolution, "batch_sizes": options.batch_sizes,
            "mixed_precision": options.mixed_precision,
            "warmup": options.warmup, "steps": options.steps, "reward_warmup_steps": [options.heavy_warmup, options.heavy_steps],
            "deadline_s": ns.deadline_s,
            "reward_rollout_steps": options.reward_steps,
            "peak_bf16_tflops": options.peak_tflops, "peak_card": options.extra.get("peak_label"), "peak_source": PEAK_SOURCE,
            "flops": "torch.utils.flop_counter.FlopCounterMode on one untimed step before the warm-up: forward + backward + checkpoint recomputation (rows whose FLOPs differ)",
            "step": "longalign.training.micro_step: loss_fn + accelerator.backward + clip_grad_norm_ + AdamW step (data loading excluded)",
        },
        "results": [],
        "comparisons": [],
    }
    recorder = Recorder(Path(ns.out) if ns.out else None, run)
    temporary = None
    if ns.models:
        models_root = Path(ns.models)
    else:
        temporary = tempfile.mkdtemp(prefix=f"longalign-bench-{options.size}-")
        models_root = Path(temporary)
    workdir = Path(tempfile.mkdtemp(prefix="longalign-bench-work-"))
    try:
        t0 = time.perf_counter()
        print(f"writing {options.size} models to {models_root} ...", flush=True)
        build_device = "cuda" if options.device.type == "cuda" else "cpu"
        folders = ensure_models(options.size, models_root, device=build_device)
        run["settings"]["model_write_seconds"] = round(time.perf_counter() - t0, 2)
        recorder.save()
        runner = Runner(options, folders, recorder, workdir)
        for stage in options.stages:
            print(f"[{stage}]", flush=True)
            if stage == "sample":
                runner.sample_stage()
            elif stage == "chain":
                runner.chain()
            else:
                runner.train_stage(stage)
        runner.later_comparisons()
    finally:
        run["settings"]["total_seconds"] = round(time.perf_counter() - started, 2)
        recorder.save()
        shutil.rmtree(workdir, ignore_errors=True)
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
    print()
    print(f"{options.size} on {run['machine'].get('gpu', run['machine']['cpu'])}, {options.resolution} px, "
          f"{run['settings']['total_seconds']} s in total" + (f"; results appended to {ns.out}" if ns.out else ""))  # fmt: skip
    print(markdown(run))
    failed = [r["name"] for r in run["results"] if r.get("status") == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
