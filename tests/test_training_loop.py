"""The shared loop's guard rails, in-process: non-finite losses and argument checks (issue 5)."""

import logging

import pytest
import torch
from torch import nn

from longalign.config import AlignArguments, ModelArguments, RewardArguments
from longalign.data import CaptionDataset, DataSettings
from longalign.loading import UserError
from longalign.training import Stage, StageParts, make_accelerator, run_training


class StopTraining(Exception):
    pass


def tiny_loop(tmp_path, loss_fn, max_nonfinite_steps):
    args = AlignArguments(
        output_dir=str(tmp_path / "run"), dataset="unused.jsonl", train_batch_size=2, gradient_accumulation_steps=1,
        mixed_precision="no", report_to="none", dataloader_num_workers=0, max_train_steps=10, cpu=True,
        max_nonfinite_steps=max_nonfinite_steps, validation_prompts=[],
    )  # fmt: skip
    table = [{"path": f"{i}.png", "caption": f"caption {i}"} for i in range(8)]
    parts = StageParts(unet=nn.Linear(3, 3), vae=None, encoder=None, noise_scheduler=None, weight_dtype=torch.float32)
    stage = Stage("test", parts, {"unet": parts.unet}, loss_fn)
    dataset = CaptionDataset(table, DataSettings(dataset="unused.jsonl"))
    run_training(ModelArguments(), args, make_accelerator(args), stage, dataset)


def test_nonfinite_losses_are_skipped_then_stop(tmp_path, caplog):
    calls = []

    def nan_then_stop(parts, batch, generator):
        calls.append(parts.unet.weight.detach().clone())
        if len(calls) == 3:
            raise StopTraining
        return parts.unet(torch.ones(1, 3)).sum() * float("nan"), {}

    with caplog.at_level(logging.WARNING, logger="longalign.training"), pytest.raises(StopTraining):
        tiny_loop(tmp_path, nan_then_stop, max_nonfinite_steps=5)
    assert caplog.text.count("non-finite loss") == 2
    assert torch.equal(calls[0], calls[2])  # skipped steps never touched the weights

    with pytest.raises(UserError, match="3 non-finite losses in a row"):
        tiny_loop(tmp_path / "again", lambda parts, batch, generator: (parts.unet.weight.sum() * float("inf"), {}), 3)


def test_stage_arguments_are_checked():
    with pytest.raises(UserError, match="--train_batch_size"):
        AlignArguments(train_batch_size=0)
    with pytest.raises(UserError, match="--mixed_precision"):
        AlignArguments(mixed_precision="fp8")
    with pytest.raises(UserError, match="--loss"):
        AlignArguments(loss="l1")
    with pytest.raises(UserError, match="contradict"):
        AlignArguments(resume_from="latest", overwrite=True)
    assert RewardArguments().train_batch_size == 8 and RewardArguments().text_irrelevant_weight == "0.3"
    assert AlignArguments().learning_rate == 3e-5 and AlignArguments().max_grad_norm == 0.3
