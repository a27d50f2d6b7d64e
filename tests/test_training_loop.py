"""The shared loop in-process: non-finite losses, argument checks, safetensors-only checkpoints (issue 5)."""

import importlib.util
import json
import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from longalign.config import AlignArguments, LcmArguments, ModelArguments, RewardArguments
from longalign.data import CaptionDataset, DataSettings
from longalign.diffusion import RolloutSettings
from longalign.loading import UserError
from longalign.training import (
    OPTIMIZER_FILE,
    Stage,
    ValidationSettings,
    StageParts,
    checkpoint_dirs,
    flatten_optimizer_state,
    make_accelerator,
    parse_stage_arguments,
    run_training,
    unflatten_optimizer_state,
)


class StopTraining(Exception):
    pass


def tiny_loop(tmp_path, loss_fn, max_nonfinite_steps=5, module=None, table=None, grad_scaler=False, stage="test", **overrides):
    """Run the real loop of a `stage` on a small module and a caption-only dataset; returns the
    trained module.

    `grad_scaler`: give the accelerator the fp16 GradScaler it has on a GPU (on the CPU it has none).
    """
    settings = dict(
        output_dir=str(tmp_path / "run"), dataset="unused.jsonl", train_batch_size=2, gradient_accumulation_steps=1,
        mixed_precision="no", report_to="none", dataloader_num_workers=0, max_train_steps=10, cpu=True,
        max_nonfinite_steps=max_nonfinite_steps, validation_prompts=[],
    )  # fmt: skip
    args = AlignArguments(**(settings | overrides))
    table = table or [{"path": f"{i}.png", "caption": f"caption {i}"} for i in range(8)]
    torch.manual_seed(0)
    unet = module if module is not None else nn.Linear(3, 3)
    no_text = SimpleNamespace(splitter=lambda: None)  # the loop asks the encoder only for its caption splitter
    parts = StageParts(unet=unet, vae=None, encoder=no_text, noise_scheduler=None, weight_dtype=torch.float32)
    dataset = CaptionDataset(table, DataSettings(dataset="unused.jsonl"))
    accelerator = make_accelerator(args)
    if grad_scaler:
        accelerator.scaler = torch.amp.GradScaler("cpu")
    run_training(ModelArguments(), args, accelerator, Stage(stage, parts, {"unet": parts.unet}, loss_fn), dataset)
    return parts.unet


@pytest.fixture
def no_final(monkeypatch):
    """These loops train a bare nn.Linear, which has no LoRA for `final/` or a checkpoint's stage
    files; the checkpoints' own state is the subject."""
    monkeypatch.setattr("longalign.training.write_final", lambda *args: None)
    monkeypatch.setattr("longalign.training.write_stage_files", lambda *args: None)


def data_and_noise_loss(parts, batch, generator):
    """A loss that depends on the data order and on the micro-step's noise, as the stages' do."""
    rows = batch["index"].float()[:, None].expand(-1, 3)
    noise = torch.randn(rows.shape, generator=generator)
    return parts.unet(rows + noise).pow(2).mean(), {}


def nan_on_call(n):
    """`data_and_noise_loss`, but NaN on its n-th call (of this loss function)."""
    calls = []

    def loss(parts, batch, generator):
        calls.append(None)
        return data_and_noise_loss(parts, batch, generator)[0] * (float("nan") if len(calls) == n else 1.0), {}

    return loss


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

    with pytest.raises(UserError, match="3 non-finite losses or gradients without an optimizer step"):
        tiny_loop(tmp_path / "again", lambda parts, batch, generator: (parts.unet.weight.sum() * float("inf"), {}), 3)


def test_a_window_without_an_optimizer_step_is_not_counted(tmp_path, no_final):
    """A non-finite loss at a window's last micro-step, or a finite loss with a non-finite gradient,
    means no optimizer step: the step is not counted (nor checkpointed), the weights stay finite, and
    a run that can never step stops instead of counting steps that changed nothing."""
    calls = []

    def nan_gradient_on_the_second_call(parts, batch, generator):
        calls.append(None)
        y = parts.unet(torch.ones(1, 3)).sum()
        if len(calls) == 2:  # finite value, NaN gradient
            return y + ((y - y.detach()) ** 2).sqrt(), {}
        return y, {}

    for name, grad_scaler in (("grad", False), ("fp16_overflow", True)):  # under fp16 the scaler skips it
        calls.clear()
        trained = tiny_loop(
            tmp_path / name, nan_gradient_on_the_second_call, max_train_steps=3, checkpointing_steps=1,
            grad_scaler=grad_scaler,
        )  # fmt: skip
        assert len(calls) == 4 and torch.isfinite(trained.weight).all()
        checkpoints = sorted(p.name for p in (tmp_path / name / "run" / "checkpoints").iterdir())
        assert checkpoints == ["step_0000001", "step_0000002", "step_0000003"]
        state = json.loads((tmp_path / name / "run" / "checkpoints" / "step_0000003" / "training_state.json").read_text())
        assert state["micro_step"] == 4 and state["lr_scheduler"]["last_epoch"] == 3
        assert (state["grad_scaler"] is not None) == grad_scaler

    def nan_at_every_window_end(parts, batch, generator):
        calls.append(None)
        return parts.unet(torch.ones(1, 3)).sum() * (float("nan") if len(calls) % 2 == 0 else 1.0), {}

    calls.clear()
    with pytest.raises(UserError, match="2 non-finite losses or gradients without an optimizer step"):
        tiny_loop(tmp_path / "window", nan_at_every_window_end, 2, gradient_accumulation_steps=2, checkpointing_steps=1)
    assert len(calls) == 4 and not (tmp_path / "window" / "run" / "checkpoints").exists()

    empty_captions = [{"path": f"{i}.png", "caption": ""} for i in range(4)]  # every row is a bad row
    with pytest.raises(UserError, match="a whole epoch passed without an optimizer step"):
        tiny_loop(tmp_path / "empty", lambda parts, batch, generator: (parts.unet.weight.sum(), {}), table=empty_captions, max_bad_fraction=1.0)


def test_stage_arguments_are_checked():
    with pytest.raises(UserError, match="--train_batch_size"):
        AlignArguments(train_batch_size=0)
    with pytest.raises(UserError, match="--mixed_precision"):
        AlignArguments(mixed_precision="fp8")
    with pytest.raises(UserError, match="--loss"):
        AlignArguments(loss="l1")
    with pytest.raises(UserError, match="unknown flag"):
        parse_stage_arguments(AlignArguments, ["--max_train_steps", "2", "--bogus", "1"])
    with pytest.raises(UserError, match="unknown flag.*--learning 1e-4"):  # not taken for --learning_rate
        parse_stage_arguments(AlignArguments, ["--learning", "1e-4"])
    assert parse_stage_arguments(AlignArguments, ["--max_train_steps", "2"])[1].max_train_steps == 2
    if importlib.util.find_spec("wandb") is None:  # accelerate would warn and log nothing
        with pytest.raises(UserError, match="wandb package"):
            AlignArguments(report_to="wandb")
    with pytest.raises(UserError, match="--checkpoints_total_limit"):
        AlignArguments(checkpoints_total_limit=-1)
    with pytest.raises(UserError, match="--resolution must be a positive multiple of 8"):
        AlignArguments(resolution=60)  # the VAE downsamples by 8: validation would fail only at its first image
    with pytest.raises(UserError, match="contradict"):
        AlignArguments(resume_from="latest", overwrite=True)
    with pytest.raises(UserError, match="--num_ddim_timesteps"):
        LcmArguments(num_ddim_timesteps=0)
    for flags, match in [
        (dict(lora_dropout=1.5), "--lora_dropout must be in"), (dict(max_grad_norm=0.0), "--max_grad_norm must be a positive"),
        (dict(learning_rate=float("inf")), "--learning_rate must be a positive"), (dict(adam_beta1=1.5), "--adam_beta1 must be in"),
        (dict(adam_epsilon=-1.0), "--adam_epsilon"), (dict(validation_steps=-1), "--validation_steps"),
        (dict(learning_rate=-1e-5), "--learning_rate"), (dict(huber_c=0.0), "--huber_c"), (dict(dataloader_num_workers=-1), "--dataloader_num_workers"),
        (dict(lr_warmup_steps=-1), "--lr_warmup_steps"), (dict(seed=-1), r"--seed must be in \[0, 2\*\*32\)"), (dict(seed=2**32), "--seed"),
        (dict(lora_dtype="float16"), "--lora_dtype must be float32 or bfloat16"),
    ]:  # fmt: skip
        with pytest.raises(UserError, match=match):
            AlignArguments(**flags)
    with pytest.raises(UserError, match="--huber_c"):
        LcmArguments(huber_c=-1.0)
    assert RewardArguments().train_batch_size == 8 and RewardArguments().text_irrelevant_weight == "0.3"
    assert AlignArguments().learning_rate == 3e-5 and AlignArguments().max_grad_norm == 0.3


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    for _ in range(2):
        model(torch.randn(4, 3)).square().mean().backward()
        optimizer.step()
    state = optimizer.state_dict()
    state["state"][0]["note"] = "kept"  # a non-tensor per-parameter value travels in the header
    tensors, metadata = flatten_optimizer_state(state)
    save_file(tensors, tmp_path / "optimizer.safetensors", metadata=metadata)
    with safe_open(tmp_path / "optimizer.safetensors", framework="pt") as file:
        restored = unflatten_optimizer_state({k: file.get_tensor(k) for k in file.keys()}, file.metadata())
    assert restored["state"].keys() == state["state"].keys()
    for param_id, values in state["state"].items():
        assert restored["state"][param_id].keys() == values.keys()
        for name, value in values.items():
            same = torch.equal(restored["state"][param_id][name], value) if torch.is_tensor(value) else restored["state"][param_id][name] == value
            assert same, (param_id, name)
    assert [tuple(g["betas"]) for g in restored["param_groups"]] == [(0.9, 0.99)]
    del restored["state"][0]["note"]
    torch.optim.AdamW(model.parameters(), lr=1.0).load_state_dict(restored)  # loads into a fresh optimizer


@pytest.mark.parametrize("lora_dtype", ["float32", "bfloat16"])
def test_checkpoints_hold_only_safetensors_and_json_and_resume_exactly(tmp_path, no_final, lora_dtype):
    """Also with the LoRA trained in bf16 (`--lora_dtype`, as released): its weights and AdamW
    moments are bf16, and they too resume exactly."""
    flags = dict(checkpointing_steps=2, learning_rate=0.1, lr_warmup_steps=3, lora_dtype=lora_dtype)  # steps 1-3: other LRs
    if lora_dtype == "bfloat16":
        flags["mixed_precision"] = "bf16"  # autocast: the toy module has no peft LoRA to cast its input
    straight = tiny_loop(tmp_path / "straight", data_and_noise_loss, max_train_steps=4, **flags)
    tiny_loop(tmp_path / "resumed", data_and_noise_loss, max_train_steps=2, **flags)
    checkpoint = tmp_path / "resumed" / "run" / "checkpoints" / "step_0000002"
    files = sorted(path.name for path in checkpoint.iterdir())
    assert files == ["optimizer.safetensors", "trainable_0.safetensors", "training_state.json"]
    resumed = tiny_loop(tmp_path / "resumed", data_and_noise_loss, max_train_steps=4, resume_from="latest", **flags)
    torch.manual_seed(0)
    initial = nn.Linear(3, 3).state_dict()
    for name, value in straight.state_dict().items():  # the warmup LR and AdamW moments were restored
        assert value.dtype == getattr(torch, lora_dtype), name
        assert not torch.equal(value, initial[name].to(value.dtype)), name
        assert torch.equal(value, resumed.state_dict()[name]), name
    from safetensors.torch import load_file

    moments = load_file(str(checkpoint / "optimizer.safetensors"))
    assert moments and all(m.dtype == getattr(torch, lora_dtype) for k, m in moments.items() if k.endswith("exp_avg")), moments.keys()
    every_file = [p for p in Path(tmp_path).rglob("checkpoints/*/*")]
    assert every_file and all(p.suffix in (".safetensors", ".json") for p in every_file)


@pytest.mark.parametrize("signum, workers", [(signal.SIGTERM, 2), (signal.SIGINT, 0)])
def test_a_signal_stops_at_the_window_end_with_a_checkpoint_that_resumes_exactly(tmp_path, no_final, signum, workers, capsys):
    """SIGTERM (a cluster ending the job, sent to the DataLoader workers too) or Ctrl-C in the
    middle of an accumulation window: the window is finished, checkpointed, and the process exits
    128 + signal; the resumed run ends with the weights of a run never stopped. The workers,
    which ignore the signal, end with the loop, not at interpreter exit (which would hang)."""
    import multiprocessing

    flags = dict(checkpointing_steps=100, learning_rate=0.1, lr_warmup_steps=3, gradient_accumulation_steps=2, max_train_steps=6)
    straight = tiny_loop(tmp_path / "straight", data_and_noise_loss, **flags)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    calls, signalled = [], []
    earlier = {child.pid for child in multiprocessing.active_children()}

    def signalled_loss(parts, batch, generator):
        calls.append(1)
        if len(calls) == 5:  # the first micro-step of optimizer step 3's window
            children = multiprocessing.active_children()  # the DataLoader workers (and any an earlier test left)
            assert len(children) >= workers
            signalled.extend(child.pid for child in children if child.pid not in earlier)  # this loop's workers
            for process in [*children, multiprocessing.current_process()]:
                os.kill(process.pid, signum)
        return data_and_noise_loss(parts, batch, generator)

    with pytest.raises(SystemExit) as exit_info:
        tiny_loop(tmp_path / "stopped", signalled_loss, dataloader_num_workers=workers, **flags)
    assert exit_info.value.code == 128 + signum and len(calls) == 6  # the window's second micro-step ran too
    checkpoints = checkpoint_dirs(str(tmp_path / "stopped" / "run"))
    assert [c.name for c in checkpoints] == ["step_0000003"]
    assert f"stopped by {signal.Signals(signum).name} at step 3: its checkpoint is {checkpoints[0]}" in capsys.readouterr().err
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers  # the loop's handlers are gone
    assert len(signalled) == workers and not [c for c in multiprocessing.active_children() if c.pid in signalled]  # exit_info keeps the frame
    resumed = tiny_loop(tmp_path / "stopped", data_and_noise_loss, resume_from="latest", **flags)
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_the_workers_end_with_the_loop_when_one_of_them_fails(tmp_path, no_final, monkeypatch):
    """A worker's error is re-raised through the loader's iterator, which the traceback keeps: the
    workers (which ignore SIGTERM) must still end with the loop, or interpreter exit waits for them."""
    import multiprocessing

    earlier = {child.pid for child in multiprocessing.active_children()}
    read_row = CaptionDataset.__getitem__

    def failing(self, index):
        if index == 5:
            raise RuntimeError("a row that cannot be read")
        return read_row(self, index)

    monkeypatch.setattr(CaptionDataset, "__getitem__", failing)  # the forked workers inherit it
    with pytest.raises(RuntimeError, match="a row that cannot be read"):
        tiny_loop(tmp_path, data_and_noise_loss, dataloader_num_workers=2, max_train_steps=10)
    assert not [child for child in multiprocessing.active_children() if child.pid not in earlier]


def test_the_loss_is_told_the_optimizer_step_also_after_a_resume(tmp_path, no_final):
    """`batch["global_step"]`: what a schedule in a loss reads (one value per accumulation window)."""
    seen = []

    def recording_loss(parts, batch, generator):
        seen.append(batch["global_step"])
        return data_and_noise_loss(parts, batch, generator)

    flags = dict(gradient_accumulation_steps=2, checkpointing_steps=1)
    tiny_loop(tmp_path, recording_loss, max_train_steps=2, **flags)
    tiny_loop(tmp_path, recording_loss, max_train_steps=3, resume_from="latest", **flags)
    assert seen == [0, 0, 1, 1, 2, 2]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, no_final):
    tiny_loop(tmp_path, data_and_noise_loss, max_train_steps=2, checkpointing_steps=2)
    for flags, match in [(dict(learning_rate=0.5), "--learning_rate 0.5 differs from the checkpoint's 3e-05"),
                         (dict(max_train_steps=1), "--max_train_steps 1 is below the step of"),
                         (dict(adam_beta2=0.99), "--adam_beta2 0.99 differs")]:  # fmt: skip
        with pytest.raises(UserError, match=match):  # restored from the checkpoint, it would be ignored
            tiny_loop(tmp_path, data_and_noise_loss, resume_from="latest", **({"max_train_steps": 4} | flags))
    with pytest.raises(UserError, match="does not match this run's trainable parameters"):
        tiny_loop(tmp_path, data_and_noise_loss, module=nn.Linear(3, 4), max_train_steps=4, resume_from="latest")
    with pytest.raises(UserError, match="step_0000002' is a checkpoint of the test stage; this run trains reward"):
        tiny_loop(tmp_path, data_and_noise_loss, stage="reward", max_train_steps=4, resume_from="latest")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000002"
    extra = checkpoint / "trainable_1.safetensors"  # as if that run had also trained an adapter
    extra.write_bytes((checkpoint / "trainable_0.safetensors").read_bytes())
    with pytest.raises(UserError, match="trained more modules than this run"):
        tiny_loop(tmp_path, data_and_noise_loss, max_train_steps=4, resume_from="latest")
    extra.unlink()
    state_file = checkpoint / "training_state.json"
    intact = state_file.read_text()
    for damage in ("{", "{}"):  # a truncated or emptied state file: one line, nothing restored
        state_file.write_text(damage)
        with pytest.raises(UserError, match="checkpoint .*step_0000002' is damaged"):
            tiny_loop(tmp_path, data_and_noise_loss, max_train_steps=4, resume_from="latest")
    state_file.write_text(intact)
    weights = checkpoint / "trainable_0.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(UserError, match="is damaged \\(SafetensorError"):
        tiny_loop(tmp_path, data_and_noise_loss, max_train_steps=4, resume_from="latest")
    (checkpoint / OPTIMIZER_FILE).unlink()
    with pytest.raises(UserError, match=f"has no {OPTIMIZER_FILE}"):
        tiny_loop(tmp_path, data_and_noise_loss, max_train_steps=4, resume_from="latest")


def run_uneven_rows_loop(out: Path, *extra: str, env: dict | None = None):
    """tests/_uneven_rows_loop.py under 2 CPU processes (accelerate launch), with `env` added to
    the environment; its CompletedProcess."""
    import os
    import subprocess

    from _two_processes import two_cpu_processes

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", **(env or {})}
    command = [*two_cpu_processes(), str(root / "tests" / "_uneven_rows_loop.py"), str(out), *extra]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=180)


def test_a_rank_without_usable_rows_skips_the_micro_step_with_the_others(tmp_path):
    """One rank's batch is all bad rows while the other's is not, and the loss makes a collective
    call: every rank must skip that micro-step together, before the loss, or the collectives pair
    up wrongly (gloo aborts, NCCL hangs)."""
    from safetensors.torch import load_file

    result = run_uneven_rows_loop(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("skipped: a batch had no usable rows") == 4  # 2 epochs x 2 ranks
    first, second = (load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_too_many_bad_rows_stop_every_rank_at_once(tmp_path):
    """The bad-row limit is on the rows of every process: each rank holds the same counts and
    raises the same error at the same micro-step (a rank deciding on its own rows stopped alone,
    and the others were left waiting in the next collective). It waits for an epoch of every
    rank's rows (4 here) at most, not one rank's share (2): one bad row in 4 is under 40%."""
    import re

    result = run_uneven_rows_loop(tmp_path / "stop", "0.2")
    assert result.returncode != 0
    errors = re.findall(r"UserError: (.* more than --max_bad_fraction 0.2)", result.stderr)
    assert len(errors) == 2 and errors[0].split(" were skipped")[0] == errors[1].split(" were skipped")[0], result.stderr[-3000:]
    result = run_uneven_rows_loop(tmp_path / "epoch", "0.4", "200")  # the bad row comes in the first 2 rows
    assert result.returncode == 0, result.stderr[-3000:]


def resume_and_compare_ranks(out: Path) -> None:
    """Resume a stopped tests/_uneven_rows_loop.py run to its end: both ranks end with the same weights."""
    from safetensors.torch import load_file

    result = run_uneven_rows_loop(out, "0.9", "2", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (load_file(out / f"rank{rank}.safetensors") for rank in (0, 1))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGUSR1 reaches rank 1 only: both ranks learn of it in the micro-step's collective, save
    one checkpoint at the same step and exit; the run then resumes on both to its end."""
    result = run_uneven_rows_loop(tmp_path, "0.9", "2", "6", "3")
    assert result.returncode != 0 and result.stderr.count("SIGUSR1: stopping with a checkpoint once the optimizer step") == 1
    assert "stopped by SIGUSR1 at step 4: its checkpoint is" in result.stderr, result.stderr[-3000:]  # dropped windows count no step
    assert [c.name for c in checkpoint_dirs(str(tmp_path / "run"))] == ["step_0000004"]
    resume_and_compare_ranks(tmp_path)


def test_run_unet_has_the_launcher_forward_sigusr1_to_every_rank(tmp_path):
    """torchrun forwards SIGUSR1 to the ranks only when told to (PET_SIGNALS_TO_HANDLE), and
    run_unet.sh tells it, keeping a value of the user's own. With that environment a SIGUSR1 to
    the launcher reaches both ranks, which stop at one step with one checkpoint; the launcher
    itself exits 1 (torchrun's SignalException). The run then resumes to its end."""
    import os
    import subprocess

    fake_python = tmp_path / "python"  # prints what the launcher would be started with
    fake_python.write_text('#!/bin/sh\necho "$PET_SIGNALS_TO_HANDLE"\n')
    fake_python.chmod(0o755)
    run_unet = Path(__file__).resolve().parents[1] / "run_unet.sh"

    def launch_signals(**env: str) -> str:
        env = {**os.environ, "NUM_GPUS": "2", "PYTHON": str(fake_python), **env}
        return subprocess.run(["bash", str(run_unet), "align", "x"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()

    assert launch_signals(PET_SIGNALS_TO_HANDLE="SIGTERM") == "SIGTERM"
    signals = launch_signals()
    assert "SIGUSR1" in signals.split(",") and "SIGTERM" in signals.split(",")
    result = run_uneven_rows_loop(tmp_path, "0.9", "2", "6", "3", "1", env={"PET_SIGNALS_TO_HANDLE": signals})
    assert result.returncode == 1 and result.stderr.count("SIGUSR1: stopping with a checkpoint") == 2, result.stderr[-3000:]
    assert "stopped by SIGUSR1 at step 4: its checkpoint is" in result.stderr
    assert [c.name for c in checkpoint_dirs(str(tmp_path / "run"))] == ["step_0000004"]
    resume_and_compare_ranks(tmp_path)


def test_what_trains_is_in_train_mode_for_the_loss_and_in_eval_mode_for_validation(tmp_path, tiny_models):
    """diffusers loads the UNet in eval mode, where peft's LoRA dropout (0.1, METHOD.md §3) is the
    identity: the loop must switch what trains (UNet LoRA, adapter) to train mode, and only that,
    and validation images must be drawn without dropout, the modes restored after. The loss gets
    each caption's CLIP segments from the DataLoader."""
    import train_align

    model_args = ModelArguments(
        pretrained_model=str(tiny_models["sd15"]), t5_model=str(tiny_models["t5"]), adapter=str(tiny_models["adapter"])
    )
    args = AlignArguments(
        output_dir=str(tmp_path / "run"), dataset="unused.jsonl", train_batch_size=1, mixed_precision="no",
        report_to="none", dataloader_num_workers=0, max_train_steps=2, gradient_accumulation_steps=1, cpu=True,
        validation_prompts=["A red circle."], validation_steps=1, resolution=64,
    )  # fmt: skip
    accelerator = make_accelerator(args)
    stage = train_align.build_stage(model_args, args, accelerator)
    in_loss, in_validation, segments = [], [], []

    def recording_loss(parts, batch, generator):
        segments.append(batch["segments"])
        dropouts = [m for name, m in parts.unet.named_modules() if name.endswith("lora_B.align.branch_dropout")]
        assert dropouts
        in_loss.append(
            dict(
                unet=parts.unet.training, lora_dropout=all(m.training for m in dropouts), adapter=parts.encoder.adapter.training,
                clip=parts.encoder.clip.text_encoder.training, t5=parts.encoder.t5.encoder.training, vae=parts.vae.training,
            )
        )  # fmt: skip
        return sum(p.sum() for p in parts.unet.parameters() if p.requires_grad) * 0.0, {}

    stage.loss_fn = recording_loss
    stage.validation = ValidationSettings(sampler="unipc", steps=2)
    for module in (stage.parts.unet, stage.parts.encoder.adapter):
        module.register_forward_pre_hook(lambda module, inputs: in_validation.append(module.training))
    table = [{"path": f"{i}.png", "caption": "A red circle."} for i in range(2)]
    run_training(model_args, args, accelerator, stage, CaptionDataset(table, DataSettings(dataset="unused.jsonl")))
    trained = dict(unet=True, lora_dropout=True, adapter=True, clip=False, t5=False, vae=False)
    assert in_loss == [trained, trained]  # the second step comes after a validation: modes were restored
    assert in_validation and not any(in_validation)  # the recording loss never calls them; validation does
    assert segments == [[["A red circle."]]] * 2


def test_a_trained_adapter_starts_from_the_files_fp32_weights_under_bf16(tmp_path, tiny_models):
    """Under bf16 mixed precision the frozen encoders load in bf16, but the adapter that align trains
    loads in fp32: cast to bf16 first, it would start from rounded weights (METHOD.md §2)."""
    import train_align
    from longalign.adapter import TextAdapter

    model_args = ModelArguments(
        pretrained_model=str(tiny_models["sd15"]), t5_model=str(tiny_models["t5"]), adapter=str(tiny_models["adapter"])
    )
    args = AlignArguments(
        output_dir=str(tmp_path / "run"), dataset="unused.jsonl", mixed_precision="bf16", report_to="none", cpu=True,
        validation_prompts=[],
    )  # fmt: skip
    encoder = train_align.build_stage(model_args, args, make_accelerator(args)).parts.encoder  # (conftest: a fresh state)
    reference = dict(TextAdapter.from_pretrained(tiny_models["adapter"]).named_parameters())
    trained = dict(encoder.adapter.named_parameters())
    assert trained.keys() == reference.keys()
    assert all(torch.equal(trained[name], reference[name]) for name in reference)  # fp32, not rounded
    assert not all(torch.equal(p, p.bfloat16().float()) for p in reference.values())  # rounding would show
    assert encoder.t5.encoder.shared.weight.dtype == torch.bfloat16


def test_a_stage_folder_carries_the_frozen_adapter_it_was_trained_with(tmp_path, tiny_models):
    """align --no_train_adapter (or any stage with --adapter X) trains against a frozen adapter:
    its final/ must hold that adapter, byte for byte, or the model card's command and the next
    stage pick another (or none)."""
    import train_align
    from longalign.training import write_final

    model_args = ModelArguments(
        pretrained_model=str(tiny_models["sd15"]), t5_model=str(tiny_models["t5"]), adapter=str(tiny_models["adapter"])
    )
    args = AlignArguments(
        output_dir=str(tmp_path / "run"), dataset="unused.jsonl", mixed_precision="no", report_to="none", cpu=True,
        validation_prompts=[], train_adapter=False,
    )  # fmt: skip
    accelerator = make_accelerator(args)
    parts = train_align.build_stage(model_args, args, accelerator).parts
    final = write_final(accelerator, args, model_args, parts, "align", 0)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (final / "adapter" / name).read_bytes() == (tiny_models["adapter"] / name).read_bytes()
    assert json.loads((final / "config.json").read_text())["adapter_source"] == str(tiny_models["adapter"])


def test_align_refuses_a_scheduler_whose_prediction_type_it_cannot_train(tmp_path, tiny_models):
    """align_loss's target is eps or v; a `sample`-prediction UNet would silently train toward v."""
    import shutil

    import train_align

    sd15 = tmp_path / "sd15"
    shutil.copytree(tiny_models["sd15"], sd15)
    config_file = sd15 / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "sample"}))
    model_args = ModelArguments(pretrained_model=str(sd15), t5_model=str(tiny_models["t5"]), adapter=str(tiny_models["adapter"]))
    args = AlignArguments(output_dir=str(tmp_path / "run"), dataset="unused.jsonl", mixed_precision="no", cpu=True, report_to="none")
    with pytest.raises(UserError, match="unsupported prediction_type 'sample'"):
        train_align.build_stage(model_args, args, make_accelerator(args))


def test_ddim_rollout_flags_with_the_lcm_rollout_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="longalign.config"):
        RewardArguments(rollout="lcm", guidance_scale=3.0, grad_steps=2)
        RewardArguments(rollout="lcm")  # the default: nothing to say
        RewardArguments(guidance_scale=3.0, grad_steps=2)  # ddim_cfg uses them
        RewardArguments(gradient_checkpointing=True)  # on top of the rollout's own: a third forward
    assert caplog.text.count("--guidance_scale, --grad_steps: no effect with --rollout lcm") == 1
    assert caplog.text.count("each such forward now runs three times") == 1


def test_reward_stage_flags():
    """The rollout is set by flags, checked before any model loads; the accumulation default is the
    released launcher's per rollout (reward 1, reward_lcm 2)."""
    settings = RewardArguments(rollout_steps=25, grad_steps=2, grad_stride=4, guidance_scale=5.0).rollout_settings()
    assert (settings.rollout_steps, settings.grad_steps, settings.grad_stride, settings.guidance_scale) == (25, 2, 4, 5.0)
    assert RewardArguments().rollout_settings() == RolloutSettings()  # the released recipe
    assert RewardArguments().gradient_accumulation_steps == 1
    assert RewardArguments(rollout="lcm").gradient_accumulation_steps == 2
    assert RewardArguments(rollout="lcm", gradient_accumulation_steps=3).gradient_accumulation_steps == 3
    with pytest.raises(UserError, match="unknown rollout 'ddpm'"):
        RewardArguments(rollout="ddpm")
    with pytest.raises(UserError, match="exceeds --rollout_steps 20"):
        RewardArguments(rollout_steps=20, grad_stride=10)
    assert RewardArguments(rollout="lcm", rollout_steps=30).rollout_settings() == RolloutSettings()  # warned: no effect


@pytest.mark.parametrize(
    "flags, message",
    [({"encoder_mode": "clip5"}, "unknown encoder mode 'clip5'"), ({"segmenter": "words"}, "unknown segmenter 'words'"),
     ({"token_length": 0}, "--token_length must be in")],
)  # fmt: skip
def test_encoder_settings_fail_before_any_model_loads(flags, message):
    with pytest.raises(UserError, match=message):
        ModelArguments(**flags)


def test_checkpoints_total_limit_keeps_the_newest(tmp_path, no_final):
    tiny_loop(tmp_path, data_and_noise_loss, max_train_steps=5, checkpointing_steps=1, checkpoints_total_limit=2)
    assert [p.name for p in checkpoint_dirs(str(tmp_path / "run"))] == ["step_0000004", "step_0000005"]


def test_a_save_cut_off_midway_leaves_the_last_complete_checkpoint(tmp_path, no_final, monkeypatch):
    """The real writer: a crash while step 3 is being saved leaves steps 1 and 2 intact, and a
    resume starts from step 2 and ends where an uninterrupted run does."""
    import longalign.training as training

    straight = tiny_loop(tmp_path / "straight", data_and_noise_loss, max_train_steps=4, checkpointing_steps=1)
    real, calls = training.flatten_optimizer_state, []

    def crash_on_the_third_save(state):
        calls.append(None)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies half-way through writing step 3
        return real(state)

    monkeypatch.setattr(training, "flatten_optimizer_state", crash_on_the_third_save)
    with pytest.raises(KeyboardInterrupt):
        tiny_loop(tmp_path / "cut", data_and_noise_loss, max_train_steps=4, checkpointing_steps=1)
    monkeypatch.setattr(training, "flatten_optimizer_state", real)
    run = tmp_path / "cut" / "run"
    assert [p.name for p in checkpoint_dirs(str(run))] == ["step_0000001", "step_0000002"]
    assert (run / "checkpoints" / ".tmp_step_0000003").is_dir()  # the partial save, ignored
    resumed = tiny_loop(tmp_path / "cut", data_and_noise_loss, max_train_steps=4, checkpointing_steps=1, resume_from="latest")
    assert all(torch.equal(value, resumed.state_dict()[name]) for name, value in straight.state_dict().items())


def test_a_skipped_loss_frees_its_graph_before_the_next_forward(tmp_path, no_final):
    """A non-finite loss's graph (activations) must be gone when the next micro-step's forward
    runs, or the step after a NaN needs memory for two micro-steps' activations."""
    import weakref

    alive = []

    def nan_then_check(parts, batch, generator):
        if alive:
            alive.append(alive[0]() is not None)
            raise StopTraining
        hidden = parts.unet(torch.ones(1, 3)) * 2.0  # an activation the graph holds
        alive.append(weakref.ref(hidden))
        return hidden.sum() * float("nan"), {}

    with pytest.raises(StopTraining):
        tiny_loop(tmp_path, nan_then_check)
    assert alive[1:] == [False]


def test_the_logged_lr_is_the_one_the_step_used(tmp_path, no_final, monkeypatch):
    logged = []
    monkeypatch.setattr("accelerate.Accelerator.log", lambda self, values, step=None, **kwargs: logged.append(values["lr"]))
    tiny_loop(tmp_path, data_and_noise_loss, max_train_steps=3, learning_rate=1.0, lr_warmup_steps=2)
    assert logged == [0.0, 0.5, 1.0]  # constant_with_warmup: step k (from 0) runs at min(k / 2, 1)


def test_resuming_an_older_checkpoint_sets_the_later_work_aside(tmp_path, no_final):
    """Resuming from step 2 of a run that reached step 4 abandons steps 3-4: `latest` must not pick
    the abandoned step 4 later, pruning must not delete the checkpoint just written, and the old
    final/ must not be overwritten: they move to checkpoints/abandoned_0/, untouched."""
    run = tmp_path / "run"
    tiny_loop(tmp_path, data_and_noise_loss, max_train_steps=4, checkpointing_steps=2, checkpoints_total_limit=0)
    (run / "final").mkdir()  # as write_final leaves it (patched out here)
    (run / "checkpoints" / ".tmp_step_0000006").mkdir()  # a save cut off by a crash
    old_step_4 = (run / "checkpoints" / "step_0000004" / "trainable_0.safetensors").read_bytes()
    weights_2 = run / "checkpoints" / "step_0000002" / "trainable_0.safetensors"
    intact = weights_2.read_bytes()
    weights_2.write_bytes(intact[:40])  # damaged: refused before anything moves, so the good ones stay found
    with pytest.raises(UserError, match="is damaged"):
        tiny_loop(tmp_path, data_and_noise_loss, max_train_steps=3, resume_from=str(weights_2.parent))
    assert [d.name for d in checkpoint_dirs(str(run))] == ["step_0000002", "step_0000004"] and (run / "final").is_dir()
    weights_2.write_bytes(intact)
    tiny_loop(
        tmp_path, data_and_noise_loss, max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=1,
        resume_from=str(run / "checkpoints" / "step_0000002"),
    )  # fmt: skip
    assert [d.name for d in checkpoint_dirs(str(run))] == ["step_0000003"]
    aside = run / "checkpoints" / "abandoned_0"
    assert sorted(p.name for p in aside.iterdir()) == ["final", "step_0000004"]
    assert (aside / "step_0000004" / "trainable_0.safetensors").read_bytes() == old_step_4
    assert not list((run / "checkpoints").glob(".tmp_step_*"))
    tiny_loop(tmp_path, data_and_noise_loss, max_train_steps=4, checkpoints_total_limit=0, resume_from="latest")
    state = json.loads((run / "checkpoints" / "step_0000004" / "training_state.json").read_text())
    assert state["global_step"] == 4 and (aside / "step_0000004").is_dir()


def test_epochs_count_passes_over_the_data(tmp_path, no_final):
    """--num_train_epochs stops when that many passes over the data are consumed. A step total
    fixed at the start ran a 1-micro-step epoch with accumulation 2 for twice the epochs (each
    epoch rounded up to a window), and a resume on another number of processes for other epochs."""
    two_rows = [{"path": f"{i}.png", "caption": f"caption {i}"} for i in range(2)]
    tiny_loop(tmp_path / "a", data_and_noise_loss, table=two_rows, max_train_steps=None, num_train_epochs=2, gradient_accumulation_steps=2)
    (checkpoint,) = checkpoint_dirs(str(tmp_path / "a" / "run"))
    state = json.loads((checkpoint / "training_state.json").read_text())
    assert (state["global_step"], state["micro_step"]) == (1, 2)  # one window: epoch 0 and epoch 1
    assert state["sampler"]["epoch"] == 1 and state["sampler"]["position"] == 2
    tiny_loop(tmp_path / "b", data_and_noise_loss, max_train_steps=None, num_train_epochs=3)  # 8 rows, batch 2
    state = json.loads((checkpoint_dirs(str(tmp_path / "b" / "run"))[-1] / "training_state.json").read_text())
    assert state["global_step"] == 12 and state["sampler"]["epoch"] == 2 and state["sampler"]["position"] == 8
    with pytest.raises(UserError, match="--num_train_epochs 2 is below the 3.00 epochs .*--max_train_steps 12 ends"):
        tiny_loop(tmp_path / "b", data_and_noise_loss, max_train_steps=None, num_train_epochs=2, resume_from="latest")

    three_rows = two_rows + [{"path": "2.png", "caption": "caption 2"}]  # windows end at 2/3 and 4/3 epochs
    flags = dict(table=three_rows, max_train_steps=None, num_train_epochs=1, train_batch_size=1, gradient_accumulation_steps=2)
    tiny_loop(tmp_path / "d", data_and_noise_loss, **flags)
    (finished,) = checkpoint_dirs(str(tmp_path / "d" / "run"))
    saved = (finished / "training_state.json").read_text()
    assert json.loads(saved)["sampler"]["position"] == 1  # 1.33 epochs: past the 1 asked for
    tiny_loop(tmp_path / "d", data_and_noise_loss, resume_from="latest", **flags)  # as after a crash past the save
    assert checkpoint_dirs(str(tmp_path / "d" / "run")) == [finished]  # it finished at once: no step more
    assert (finished / "training_state.json").read_text() == saved

    tiny_loop(tmp_path / "c", nan_on_call(4), max_train_steps=None, num_train_epochs=1)  # NaN on the last of 4 windows
    (last,) = checkpoint_dirs(str(tmp_path / "c" / "run"))  # the epoch ended on a dropped window: still saved
    state = json.loads((last / "training_state.json").read_text())
    assert state["global_step"] == 3 and state["sampler"]["position"] == 8


def test_a_failed_validation_is_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, caplog, no_final):
    def out_of_memory(accelerator, args, parts, settings, step):
        raise torch.OutOfMemoryError(f"CUDA out of memory at step {step}. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr("longalign.training.validate", out_of_memory)
    with caplog.at_level(logging.WARNING, logger="longalign.training"):
        tiny_loop(tmp_path, data_and_noise_loss, max_train_steps=3, validation_steps=2, validation_prompts=["a circle"])
    assert [c.name for c in checkpoint_dirs(str(tmp_path / "run"))] == ["step_0000003"]  # it trained to the end
    failed = [r.getMessage() for r in caplog.records if "validation at step" in r.getMessage()]
    assert failed == [
        f"validation at step {step} failed, training goes on: CUDA out of memory at step {step}. Tried to allocate 2.00 GiB"
        for step in (2, 3)  # in the loop, and after final/
    ]


def test_a_step_saved_again_keeps_its_old_version_until_the_new_one_is_in_place(tmp_path, monkeypatch, no_final):
    """Step 3 is saved at its window and again when the epoch ends on a dropped window (4 rows
    later): a crash while the new version moves in must leave a complete step 3, not none."""

    def crash_on_moving_in(source, target, rename=os.replace):
        if Path(source).name == ".tmp_step_0000003" and (Path(target).parent / ".old_step_0000003").exists():
            raise OSError("disk gone")
        rename(source, target)

    with monkeypatch.context() as crashing, pytest.raises(OSError, match="disk gone"):
        crashing.setattr("longalign.training.os.replace", crash_on_moving_in)
        tiny_loop(tmp_path, nan_on_call(4), max_train_steps=None, num_train_epochs=1, checkpointing_steps=1)
    kept = tmp_path / "run" / "checkpoints" / ".old_step_0000003"
    assert json.loads((kept / "training_state.json").read_text())["sampler"]["position"] == 6  # the first save
    tiny_loop(tmp_path / "again", nan_on_call(4), max_train_steps=None, num_train_epochs=1, checkpointing_steps=1)
    folders = sorted(p.name for p in (tmp_path / "again" / "run" / "checkpoints").iterdir())
    assert folders == ["step_0000001", "step_0000002", "step_0000003"]  # no .old_step_ left
    last = json.loads((tmp_path / "again" / "run" / "checkpoints" / "step_0000003" / "training_state.json").read_text())
    assert last["sampler"]["position"] == 8  # the second save replaced the first


def test_the_output_folder_is_checked_before_anything_loads(tmp_path, capsys, no_final):
    """A used --output_dir, one under a file, or another run's checkpoint resumed into a folder that
    holds a run: one line before the dataset or any model loads (those flags name nothing real)."""
    import train_align

    tiny_loop(tmp_path / "a", data_and_noise_loss, max_train_steps=2, checkpointing_steps=1)
    tiny_loop(tmp_path / "b", data_and_noise_loss, max_train_steps=2, checkpointing_steps=1)
    (tmp_path / "a_file").write_text("x")
    other = tmp_path / "b" / "run" / "checkpoints" / "step_0000001"
    for flags, message in [
        ([], "holds another run; pass --resume_from latest"),
        (["--output_dir", str(tmp_path / "a_file" / "run")], "is a file, not a folder"),
        (["--resume_from", str(other)], "holds another run than the one"),
    ]:
        argv = ["--output_dir", str(tmp_path / "a" / "run"), "--dataset", "/no/such.jsonl", "--pretrained_model", "/no/such", *flags]
        with pytest.raises(SystemExit) as exit_info:
            train_align.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert [d.name for d in checkpoint_dirs(str(tmp_path / "a" / "run"))] == ["step_0000001", "step_0000002"]


def checkpoint_and_longer_run(tmp_path):
    """A 2-step tiny run's checkpoint, and the flags of the same run continued to 10 steps."""
    tiny_loop(tmp_path, data_and_noise_loss, max_train_steps=2, checkpointing_steps=2)
    (checkpoint,) = checkpoint_dirs(str(tmp_path / "run"))
    args = AlignArguments(output_dir=str(tmp_path / "run"), dataset="unused.jsonl", max_train_steps=10, validation_prompts=[], **{
        "train_batch_size": 2, "gradient_accumulation_steps": 1, "mixed_precision": "no", "report_to": "none",
        "dataloader_num_workers": 0, "cpu": True, "max_nonfinite_steps": 5,
    })  # fmt: skip
    return checkpoint, args


def test_a_resume_on_other_models_is_refused_and_changed_flags_are_named(tmp_path, no_final):
    """The checkpoint's LoRA was trained on its run's models and earlier stages: resuming it on other
    ones, or with another data order or LoRA rank, is refused. Other training flags apply from the
    resume on, and a warning names them."""
    from longalign.training import resumed_differences

    checkpoint, args = checkpoint_and_longer_run(tmp_path)
    refused = resumed_differences(checkpoint, ModelArguments(init_from=["runs/lcm-x/final"]), args)["refused"]
    assert refused == ["--init_from [] (this run: ['runs/lcm-x/final'])"]
    assert resumed_differences(checkpoint, ModelArguments(token_length=120), args)["refused"][0].startswith("--token_length 240")
    assert resumed_differences(checkpoint, ModelArguments(), args) == {"refused": [], "changed": []}  # only a longer run
    args.dataset = "moved/unused.jsonl"  # data that moved, or other data with as many rows: said, not refused
    assert resumed_differences(checkpoint, ModelArguments(), args)["changed"] == ["--dataset unused.jsonl (this run: moved/unused.jsonl)"]
    args.dataset = "unused.jsonl"
    args.caption_dropout, args.seed, args.gradient_accumulation_steps, args.split = 0.2, 1, 2, "train[5:]"
    assert resumed_differences(checkpoint, ModelArguments(), args) == {
        "refused": ["--split train (this run: train[5:])", "--seed 0 (this run: 1)"],  # other rows at the same position
        "changed": ["--gradient_accumulation_steps 1 (this run: 2)", "--caption_dropout 0.1 (this run: 0.2)"],
    }  # fmt: skip
    with pytest.raises(UserError, match="was trained with --seed 0 \\(this run: 1\\)"):
        tiny_loop(tmp_path, data_and_noise_loss, max_train_steps=4, resume_from="latest", seed=1)


def test_a_resume_names_the_flags_it_changes(tmp_path, no_final, caplog):
    tiny_loop(tmp_path, data_and_noise_loss, max_train_steps=2, checkpointing_steps=2)
    with caplog.at_level(logging.WARNING, logger="longalign.training"):
        tiny_loop(tmp_path, data_and_noise_loss, max_train_steps=4, resume_from="latest", caption_dropout=0.2)
    assert caplog.text.count("resuming with changed flags (the checkpoint's value, then this run's, which applies from here on): --caption_dropout 0.1 (this run: 0.2)") == 1


def test_a_resume_checks_earlier_stages_by_their_weights_and_takes_a_gone_model_as_moved(tmp_path, no_final):
    """An earlier stage (or a frozen --adapter) trained further or retrained at the same path since
    is refused by content; a rewritten config.json or model card is no change. A model path other
    than the recorded one is named, not refused, when nothing is at the recorded path now."""
    from longalign.pipeline import source_digests
    from longalign.training import resumed_differences

    checkpoint, args = checkpoint_and_longer_run(tmp_path)
    moved = resumed_differences(checkpoint, ModelArguments(pretrained_model=str(tmp_path)), args)  # the hub id, downloaded
    assert moved == {"refused": [], "changed": [
        f"--pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 (this run: {tmp_path}), as the recorded one is not there now"
    ]}  # fmt: skip
    other_hub_model = ModelArguments(pretrained_model="stabilityai/stable-diffusion-2-1")  # two hub ids: another model
    assert resumed_differences(checkpoint, other_hub_model, args)["refused"][0].startswith("--pretrained_model stable-diffusion-v1-5/")

    align, adapter = tmp_path / "align_final", tmp_path / "adapter"
    (align / "adapter").mkdir(parents=True)
    adapter.mkdir()
    (align / "pytorch_lora_weights.safetensors").write_bytes(b"align at step 2")
    (adapter / "diffusion_pytorch_model.safetensors").write_bytes(b"a frozen adapter")
    run_config = tmp_path / "run" / "config.json"  # the checkpoint's, as it has none of its own
    config = json.loads(run_config.read_text())
    config["model"] |= {"init_from": [str(align)], "adapter": str(adapter), "pretrained_model": str(align)}
    config["weights_sha256"] = source_digests([str(align)], str(adapter))
    config["training"]["train_adapter"] = args.train_adapter = False  # a frozen adapter, as in the later stages
    run_config.write_text(json.dumps(config))
    same = ModelArguments(pretrained_model=str(align), init_from=[str(align)], adapter=str(adapter))
    assert resumed_differences(checkpoint, same, args) == {"refused": [], "changed": []}
    (align / "config.json").write_text('{"stage": "align", "rewritten": "by a resume at its last step"}')
    (align / "README.md").write_text("model card")
    assert resumed_differences(checkpoint, same, args) == {"refused": [], "changed": []}  # no weight changed
    (tmp_path / "gone").mkdir()  # a model folder recorded, then moved away: named, not refused
    config["model"]["pretrained_model"] = str(tmp_path / "gone")
    run_config.write_text(json.dumps(config))
    (tmp_path / "gone").rmdir()
    assert resumed_differences(checkpoint, same, args)["changed"] == [
        f"--pretrained_model {tmp_path / 'gone'} (this run: {align}), as the recorded one is not there now"
    ]
    config["model"]["pretrained_model"] = str(tmp_path)  # a model folder that is still there: another one is refused
    run_config.write_text(json.dumps(config))
    assert resumed_differences(checkpoint, same, args)["refused"] == [f"--pretrained_model {tmp_path} (this run: {align})"]
    same.pretrained_model = str(tmp_path)
    (adapter / "diffusion_pytorch_model.safetensors").write_bytes(b"the adapter retrained")
    (align / "pytorch_lora_weights.safetensors").write_bytes(b"align at step 4")
    digests = source_digests([str(align)], str(adapter))
    then = config["weights_sha256"]
    assert resumed_differences(checkpoint, same, args)["refused"] == [
        f"--init_from {align} as it was then (sha256 {then['init_from'][0]}; it is {digests['init_from'][0]} now: changed since)",
        f"--adapter {adapter} as it was then (sha256 {then['adapter']}; it is {digests['adapter']} now: changed since)",
    ]


def test_gradients_are_clipped_to_max_grad_norm_before_the_step(tmp_path, no_final, monkeypatch):
    norms = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    tiny_loop(tmp_path, lambda parts, batch, generator: (1e3 * parts.unet(torch.ones(1, 3)).sum(), {}), max_train_steps=2, max_grad_norm=0.3)
    assert len(norms) == 2 and all(0.3 * 0.99 < n <= 0.3 * (1 + 1e-4) for n in norms), norms  # the raw norm is ~1e3
