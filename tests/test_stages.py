"""The four training stages end to end on tiny models: chain, resume, 2 processes, bad input (issue 5)."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_align
import train_lcm
import train_reward
from _two_processes import two_cpu_processes
from longalign.data import write_tiny_dataset
from longalign.pipeline import source_digests
from longalign.training import checkpoint_dirs
from test_sample import expect_user_error

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd, env=None, check=True):
    """Run a command; return the completed process (stdout+stderr in .stdout)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable, **(env or {})}
    result = subprocess.run(args, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[:3]} failed ({result.returncode}):\n{result.stdout[-4000:]}")
    return result


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), n=5, resolution=64)


def common_flags(tiny_models, dataset, steps=2):
    return [
        "--pretrained_model", str(tiny_models["sd15"]), "--t5_model", str(tiny_models["t5"]),
        "--dataset", str(dataset), "--resolution", "64", "--train_batch_size", "2",
        "--max_train_steps", str(steps), "--mixed_precision", "no", "--dataloader_num_workers", "0",
        "--lr_warmup_steps", "1", "--learning_rate", "1e-3",
        "--validation_prompts", "A red circle. A blue square.", "--validation_steps", "0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_models, dataset):
    """align -> lcm -> reward -> reward_lcm through run_unet.sh, 2 optimizer steps each."""
    cwd = tmp_path_factory.mktemp("chain")
    flags = common_flags(tiny_models, dataset)
    prompts = cwd / "prompts.jsonl"  # the reward stages train on captions alone: no image column
    rows = [json.loads(line) for line in Path(dataset).read_text().splitlines()]
    prompts.write_text("".join(json.dumps({"caption": row["caption"]}) + "\n" for row in rows))
    reward_flags = ["--reward_model", str(tiny_models["preference"]), "--train_batch_size", "2", "--dataset", str(prompts)]
    outputs = {}
    for stage, extra in [
        ("align", ["--adapter", str(tiny_models["adapter"])]),
        ("lcm", []),
        ("reward", reward_flags),
        ("reward_lcm", reward_flags),
    ]:
        outputs[stage] = run(["bash", str(ROOT / "run_unet.sh"), stage, "tiny", *flags, *extra], cwd).stdout
    return cwd, outputs


def test_chain_writes_final_artifacts(chain):
    cwd, outputs = chain
    for stage in ("align", "lcm", "reward", "reward_lcm"):
        final = cwd / "runs" / f"{stage}-tiny" / "final"
        assert (final / "pytorch_lora_weights.safetensors").exists(), stage
        config = json.loads((final / "config.json").read_text())
        assert config["stage"] == stage and config["training"]["max_train_steps"] == 2
        card = (final / "README.md").read_text()
        assert card.startswith(f"# LongAlign stage `{stage}`")
        assert ("--sampler lcm" in card) == (stage in ("lcm", "reward_lcm")), stage  # LCM stages sample with LCM
        assert f"--pretrained_model {config['model']['pretrained_model']} --t5_model" in card, stage  # not the defaults
        assert "--token_length" not in card and "--segmenter" not in card, stage  # the defaults
        adapter = final / "adapter" / "diffusion_pytorch_model.safetensors"  # every stage names its own
        aligned = cwd / "runs" / "align-tiny" / "final" / "adapter" / "diffusion_pytorch_model.safetensors"
        assert adapter.read_bytes() == aligned.read_bytes(), stage  # later stages: a copy of align's
        assert (cwd / "runs" / f"{stage}-tiny" / "validation" / "step_0000002.png").exists()
        assert outputs[stage].count(f"{stage} done at step 2: runs/{stage}-tiny/final holds the LoRA") == 1, stage
        (checkpoint,) = checkpoint_dirs(cwd / "runs" / f"{stage}-tiny")
        assert checkpoint.name == "step_0000002"
        for name in ("pytorch_lora_weights.safetensors", "adapter/diffusion_pytorch_model.safetensors"):
            saved, last = load_file(checkpoint / name), load_file(final / name)  # a stage folder too
            assert saved.keys() == last.keys() and all(torch.equal(saved[k], last[k]) for k in saved), (stage, name)
        assert json.loads((checkpoint / "config.json").read_text())["stage"] == stage
    lcm_config = json.loads((cwd / "runs" / "lcm-tiny" / "final" / "config.json").read_text())
    assert lcm_config["model"]["init_from"] == ["runs/align-tiny/final"]
    assert lcm_config["adapter_source"] == "runs/align-tiny/final/adapter"
    align_final = str(cwd / "runs" / "align-tiny" / "final")  # what lcm was trained on, by content
    assert lcm_config["weights_sha256"] == source_digests([align_final], os.path.join(align_final, "adapter"))
    reward_lcm = json.loads((cwd / "runs" / "reward_lcm-tiny" / "final" / "config.json").read_text())
    assert reward_lcm["model"]["init_from"] == ["runs/align-tiny/final", "runs/lcm-tiny/final"]
    assert reward_lcm["training"]["rollout"] == "lcm" and reward_lcm["training"]["gradient_accumulation_steps"] == 2


def test_trained_adapter_differs_from_initial(chain, tiny_models):
    cwd, _ = chain
    trained = load_file(cwd / "runs" / "align-tiny" / "final" / "adapter" / "diffusion_pytorch_model.safetensors")
    initial = load_file(tiny_models["adapter"] / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)


@pytest.mark.parametrize(
    "sampler, folders",
    [
        ("unipc", ["align-tiny/final", "reward-tiny/checkpoints/step_0000002"]),
        ("lcm", ["align-tiny/final", "lcm-tiny/final", "reward_lcm-tiny/final"]),
    ],
)
def test_stage_outputs_load_in_sample(chain, tiny_models, sampler, folders):
    """Stage folders: `final/`, or a checkpoint (a reward step picked by its validation grid)."""
    cwd, _ = chain
    out = cwd / f"samples-{sampler}"
    init_from = [str(cwd / "runs" / folder) for folder in folders]
    run(
        [
            sys.executable, str(ROOT / "sample.py"), "--pretrained_model", str(tiny_models["sd15"]),
            "--t5_model", str(tiny_models["t5"]), "--init_from", *init_from, "--sampler", sampler,
            "--prompt", "A red circle on the left. A blue square on the right.", "--height", "64", "--width", "64",
            "--out", str(out),
        ],
        cwd,
    )  # fmt: skip
    sidecar = json.loads((out / "0000_00.json").read_text())
    assert sidecar["checkpoints"]["adapter"] == os.path.join(init_from[-1], "adapter")
    assert sidecar["checkpoints"]["init_from"] == init_from
    assert (out / "0000_00.png").exists()


def test_reward_stage_logs_the_decomposed_scores(chain):
    cwd, _ = chain
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = cwd / "runs" / "reward-tiny" / "logs"
    tags = set()
    for event_file in logs.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "score", "score_text_relevant", "score_text_irrelevant", "eta"} <= tags


def test_existing_run_is_refused_without_resume_or_overwrite(chain, tiny_models, dataset):
    cwd, _ = chain
    result = run(
        ["bash", str(ROOT / "run_unet.sh"), "align", "tiny", *common_flags(tiny_models, dataset), "--adapter", str(tiny_models["adapter"])],
        cwd,
        check=False,
    )
    assert result.returncode == 2
    assert "holds another run" in result.stdout and "Traceback" not in result.stdout


def align_cmd(tiny_models, dataset, output_dir, steps, *extra):
    return [
        sys.executable, str(ROOT / "train_align.py"), *common_flags(tiny_models, dataset, steps),
        "--adapter", str(tiny_models["adapter"]), "--output_dir", str(output_dir), "--checkpointing_steps", "2", *extra,
    ]  # fmt: skip


def test_resume_equals_uninterrupted(tmp_path, tiny_models, dataset):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(align_cmd(tiny_models, dataset, straight, 4, "--gradient_accumulation_steps", "2"), tmp_path)
    run(align_cmd(tiny_models, dataset, resumed, 2, "--gradient_accumulation_steps", "2"), tmp_path)
    run(align_cmd(tiny_models, dataset, resumed, 4, "--gradient_accumulation_steps", "2", "--resume_from", "latest"), tmp_path)
    for name in ("pytorch_lora_weights.safetensors", "adapter/diffusion_pytorch_model.safetensors"):
        a, b = load_file(straight / "final" / name), load_file(resumed / "final" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key}"
    state = json.loads((resumed / "checkpoints" / "step_0000004" / "training_state.json").read_text())
    assert state["global_step"] == 4 and state["micro_step"] == 8


def test_resume_without_checkpoint_and_bad_init_from(tmp_path, tiny_models, dataset, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the stage scripts' `main` in this process on the commands' flags: seconds cheaper than a new process
    expect_user_error(align_cmd(tiny_models, dataset, tmp_path / "fresh", 2, "--resume_from", "latest")[2:], capsys, "no checkpoint", main=train_align.main)
    empty_stage = tmp_path / "empty_stage"
    (empty_stage / "adapter").mkdir(parents=True)
    command = align_cmd(tiny_models, dataset, tmp_path / "x", 2, "--init_from", str(empty_stage))
    expect_user_error(command[2:], capsys, "pytorch_lora_weights.safetensors", main=train_align.main)
    (tmp_path / "runs").mkdir()  # a mistyped NAME: a missing local folder, never a hub repo 'runs/align-nosuch'
    command = align_cmd(tiny_models, dataset, tmp_path / "y", 2, "--init_from", "runs/align-nosuch/final")
    expect_user_error(command[2:], capsys, "no such file or folder 'runs/align-nosuch/final'", main=train_align.main)
    (tmp_path / "cut_off").mkdir()  # a run stopped before its first checkpoint: the advice must not go round
    (tmp_path / "cut_off" / "config.json").write_text("{}")
    expect_user_error(align_cmd(tiny_models, dataset, tmp_path / "cut_off", 2)[2:], capsys, "saved no checkpoint; pass --overwrite", main=train_align.main)


def test_align_without_adapter_starts_from_lavi_bridge(tmp_path, tiny_models, dataset, capsys):
    """METHOD.md §2: LaVi-Bridge's adapter initialises align; offline, its hub path is named in one line."""
    cmd = [c for c in align_cmd(tiny_models, dataset, tmp_path / "out", 2)]
    del cmd[cmd.index("--adapter") : cmd.index("--adapter") + 2]
    expect_user_error(cmd[2:], capsys, "shihaozhao/LaVi-Bridge/t5_unet/adapter", main=train_align.main)
    # Only align has that default: a later stage with neither --init_from nor --adapter is refused.
    lcm = [sys.executable, str(ROOT / "train_lcm.py"), *common_flags(tiny_models, dataset), "--output_dir", str(tmp_path / "lcm")]
    assert "LaVi-Bridge" not in expect_user_error(lcm[2:], capsys, "no adapter", main=train_lcm.main)


def test_training_on_the_released_weights_warns_about_the_segmenter(tmp_path, tiny_models, dataset, capsys, caplog, monkeypatch):
    """LongSD's LoRAs were trained on `legacy` segments (METHOD.md §1); a stage built on them with
    another segmenter says so before anything is fetched, as sample.py does."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub fetch then fails; the warning comes first
    lcm = [*common_flags(tiny_models, dataset), "--output_dir", str(tmp_path / "lcm")]
    released = ["--init_from", "luping-liu/LongSD/s28750_lora_vis.pt", "--adapter", "luping-liu/LongSD/s28750_adapter"]
    with caplog.at_level(logging.WARNING, logger="longalign.training"):
        expect_user_error([*lcm, *released], capsys, "luping-liu/LongSD", main=train_lcm.main)
        assert "s28750_adapter was trained on prompts split by --segmenter legacy; this run splits them by --segmenter sentences" in caplog.text
        caplog.clear()
        expect_user_error([*lcm, "--init_from", str(tmp_path / "lora_vis.pt"), "--adapter", str(tiny_models["adapter"])], capsys, "lora_vis.pt", main=train_lcm.main)
        assert "lora_vis.pt was trained on prompts split by --segmenter legacy" in caplog.text  # a local copy of a released file
        caplog.clear()
        expect_user_error([*lcm, *released, "--segmenter", "legacy"], capsys, "luping-liu/LongSD", main=train_lcm.main)
        assert "trained on prompts split" not in caplog.text


def test_reward_stage_checks_its_preference_model_before_the_diffusion_models(tmp_path, tiny_models, dataset, capsys):
    """A missing --reward_model fails in seconds, not after SD, T5 and the adapter have loaded."""
    flags = [*common_flags(tiny_models, dataset), "--output_dir", str(tmp_path / "reward"), "--init_from", str(tmp_path / "no_align")]
    expect_user_error([*flags, "--reward_model", str(tmp_path / "no_scorer")], capsys, "no_scorer", main=train_reward.main)


@pytest.mark.parametrize("script", ["train_align", "train_lcm", "train_reward", "sample"])
def test_help_lists_every_flag(script, capsys):
    """`--help` formats every flag's help text (argparse reads a stray `%` as a format and fails),
    each default said once: not after a help that says it, nor as "None"."""
    module = __import__(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--segmenter" in out and ("--split" in out) == script.startswith("train")
    flat = " ".join(out.split())
    assert "(default: None)" not in flat and "(default: sentences)" in flat and "(default: 0)" in flat, flat  # --seed 0
    said = "the sampler's" if script == "sample" else "the table file's folder"  # --steps; --image_root
    assert f"(default: {said})" in flat and f"(default: {said}). (default" not in flat and f"(default: {said}) (default" not in flat


def test_too_many_bad_rows_stop_with_a_clear_message(tmp_path, tiny_models):
    data = write_tiny_dataset(tmp_path / "bad", n=2, resolution=64, broken_image=True, missing_image=True)
    result = run(align_cmd(tiny_models, data, tmp_path / "out", 2), tmp_path, check=False)
    assert result.returncode == 2 and "rows" in result.stdout and "Traceback" not in result.stdout


def test_interrupted_save_leaves_previous_checkpoint_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step:07d}").mkdir(parents=True)
        (root / f"step_{step:07d}" / "training_state.json").write_text("{}")
    (root / ".tmp_step_0000006").mkdir()  # a save that crashed half-way
    (root / "step_0000008").mkdir()  # a folder without its state file is not a checkpoint
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["step_0000002", "step_0000004"]


def test_two_processes_on_cpu(tmp_path, tiny_models, dataset):
    """Also launched without --cpu: with no GPU, the two processes still train together (accelerate
    alone ran them as two separate runs in one folder)."""
    out = tmp_path / "ddp"
    launch = two_cpu_processes()
    warmup = ("--lr_warmup_steps", "10")  # LR = 1e-3 * optimizer steps / 10 throughout these runs
    cmd = align_cmd(tiny_models, dataset, out, 2, *warmup)[1:]
    result = run([*launch, *cmd], tmp_path)
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["num_processes"] == 2, result.stdout[-2000:]
    assert (out / "final" / "pytorch_lora_weights.safetensors").exists()
    # Only the main process writes a checkpoint; every rank must load it, or the ranks' weights and
    # AdamW moments part ways and the run's closing rank-agreement check fails.
    cmd = align_cmd(tiny_models, dataset, out, 3, "--cpu", "--resume_from", "latest", *warmup)[1:]
    result = run([*launch, *cmd], tmp_path, env={"ACCELERATE_USE_CPU": "true"})
    state = json.loads((out / "checkpoints" / "step_0000003" / "training_state.json").read_text())
    assert state["global_step"] == 3, result.stdout[-2000:]
    # Warmup counts optimizer steps, so resuming on another number of processes keeps the LR curve.
    run(align_cmd(tiny_models, dataset, out, 4, "--resume_from", "latest", *warmup), tmp_path)
    state = json.loads((out / "checkpoints" / "step_0000004" / "training_state.json").read_text())
    assert state["lr_scheduler"]["_last_lr"] == pytest.approx([1e-3 * 4 / 10])


@pytest.mark.parametrize("stage", ["lcm", "reward"])
def test_later_stages_on_two_processes(chain, tiny_models, dataset, stage):
    """The later stages under DDP too (2 CPU processes): lcm's teacher call switches the LoRA off
    inside the wrapped UNet, reward backpropagates through checkpointed rollout calls and gathers
    the common direction. The run's closing check fails if the ranks' weights part ways."""
    cwd, _ = chain
    launch = two_cpu_processes()
    script = {"lcm": "train_lcm.py", "reward": "train_reward.py"}[stage]
    extra = ["--reward_model", str(tiny_models["preference"]), "--rollout", "ddim_cfg"] if stage == "reward" else []
    out = cwd / "runs" / f"{stage}-ddp"
    command = [
        *launch, str(ROOT / script), *common_flags(tiny_models, dataset), "--init_from", "runs/align-tiny/final",
        "--output_dir", str(out), "--cpu", *extra,
    ]  # fmt: skip
    result = run(command, cwd, env={"ACCELERATE_USE_CPU": "true"})
    assert "all 2 processes hold the same trainable weights" in result.stdout, result.stdout[-2000:]
    assert json.loads((out / "final" / "config.json").read_text())["num_processes"] == 2


def test_run_unet_refuses_a_bad_num_gpus_or_run_name(tmp_path):
    result = run(["bash", str(ROOT / "run_unet.sh"), "align", "x"], tmp_path, env={"NUM_GPUS": "two"}, check=False)
    assert result.returncode == 2 and "NUM_GPUS must be a whole number (got 'two')" in result.stdout
    result = run(["bash", str(ROOT / "run_unet.sh"), "align", "x"], tmp_path, env={"ACCELERATE_CONFIG": "no.yaml"}, check=False)
    assert result.returncode == 2 and "ACCELERATE_CONFIG: no such file 'no.yaml'" in result.stdout
    result = run(["bash", str(ROOT / "run_unet.sh"), "lcm", "x/y"], tmp_path, check=False)  # runs/lcm-x/y: inside lcm-x
    assert result.returncode == 2 and "RUN_NAME 'x/y' has a '/'" in result.stdout
