"""Helper for tests/test_training_loop.py: run under `accelerate launch --multi_gpu --num_processes 2` on CPU.

The shared loop on a bare nn.Linear with batch size 1 over four captions, one of them empty, so
at one micro-step one rank's batch has no usable row while the other's has one. The loss makes a
collective call, as the reward stages' common direction does (`accelerator.gather`); the ranks
must still agree on every collective. Each rank writes its final weights to OUT/rank{R}.safetensors.
Optional arguments: the --max_bad_fraction (e.g. 0.2, which the one empty caption exceeds), the
--min_rows_before_check (default 2), the --max_train_steps (default 2) and `stop_at`: when given,
rank 1 alone sends itself SIGUSR1 in its loss call of that number (the other rank is not told).
With a sixth argument 1, rank 1 sends it to the launcher instead and waits until the launcher
has forwarded it back (to every rank, when the launcher is told to forward SIGUSR1).
"""

import os
import signal
import sys
import time
from types import SimpleNamespace

import torch
from safetensors.torch import save_file
from torch import nn

from longalign import training
from longalign.config import AlignArguments, ModelArguments
from longalign.data import CaptionDataset, DataSettings


def main(out: str, max_bad_fraction: float = 0.9, min_rows_before_check: float = 2, max_train_steps: float = 2, stop_at: float = 0, to_launcher: float = 0) -> None:
    args = AlignArguments(
        output_dir=f"{out}/run", dataset="unused.jsonl", train_batch_size=1, gradient_accumulation_steps=1,
        mixed_precision="no", report_to="none", dataloader_num_workers=0, max_train_steps=int(max_train_steps), cpu=True,
        validation_prompts=[], max_bad_fraction=max_bad_fraction, min_rows_before_check=int(min_rows_before_check), learning_rate=0.1,
        lr_warmup_steps=0, resume_from="auto",
    )  # fmt: skip
    accelerator = training.make_accelerator(args)
    table = [{"path": f"{i}.png", "caption": "" if i == 2 else f"caption {i}"} for i in range(4)]
    torch.manual_seed(0)
    no_text = SimpleNamespace(splitter=lambda: None)  # the loop asks the encoder only for its caption splitter
    parts = training.StageParts(unet=nn.Linear(3, 3), vae=None, encoder=no_text, noise_scheduler=None, weight_dtype=torch.float32)

    calls = []

    def loss_fn(parts, batch, generator):
        calls.append(1)
        if accelerator.process_index == 1 and len(calls) == stop_at:
            os.kill(os.getppid() if to_launcher else os.getpid(), signal.SIGUSR1)
            stop_signals = signal.getsignal(signal.SIGUSR1).__self__  # the loop's StopSignals
            deadline = time.monotonic() + 60
            while not stop_signals.received and time.monotonic() < deadline:
                time.sleep(0.05)  # the launcher's copy arrives within its monitor interval
        rows_everywhere = accelerator.gather(torch.tensor([float(len(batch["caption"]))])).sum()  # a collective
        inputs = batch["index"].float()[:, None].expand(-1, 3)
        return parts.unet(inputs).pow(2).mean() * rows_everywhere / rows_everywhere, {}

    training.write_final = lambda *args: None  # a bare nn.Linear has no LoRA for final/; the loop is the subject
    training.write_stage_files = lambda *args: None  # (nor for a checkpoint's stage files)
    stage = training.Stage("uneven", parts, {"unet": parts.unet}, loss_fn)
    training.run_training(ModelArguments(), args, accelerator, stage, CaptionDataset(table, DataSettings(dataset="unused.jsonl")))
    unet = accelerator.unwrap_model(stage.parts.unet)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, f"{out}/rank{accelerator.process_index}.safetensors")


if __name__ == "__main__":
    main(sys.argv[1], *map(float, sys.argv[2:]))  # then --max_bad_fraction, --min_rows_before_check, ...
