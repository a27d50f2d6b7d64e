"""sample.py: both samplers on tiny folders, reproducibility, sidecars, and every bad-input case (issue 3)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_lora import legacy_list

from longalign.config import ModelArguments
from longalign.loading import UserError
from longalign.lora import LoraSettings, add_lora, save_lora
from longalign.pipeline import lacks_lcm_stage
from longalign.tiny import tiny_unet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402

LONG_PROMPT = " ".join(
    f"In scene {i} a {colour} {shape} rests beside the old stone wall, lit by the evening sun."
    for i, (colour, shape) in enumerate(zip(["red", "blue", "green", "yellow"] * 4, ["circle", "square", "triangle", "star"] * 4))
)  # about 300 CLIP tokens


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory):
    """A diffusers-format stage folder and a released-format list file, both for the tiny UNet."""
    root = tmp_path_factory.mktemp("loras")
    torch.manual_seed(0)
    unet = tiny_unet()
    add_lora(unet, "align", LoraSettings(rank=4))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    save_lora(unet, root / "align", "align")
    torch.save(legacy_list(tiny_unet(), rank=4), root / "reward_list.pt")
    return root


def model_flags(tiny_models, *init_from):
    flags = ["--pretrained_model", str(tiny_models["sd15"]), "--t5_model", str(tiny_models["t5"]), "--adapter", str(tiny_models["adapter"])]
    return flags + (["--init_from", *map(str, init_from)] if init_from else [])


def run_sample(argv, cwd, capsys=None):
    """sample.py with `argv`: its printed output. As a subprocess (the real command line), or, given
    pytest's `capsys`, in this process (seconds cheaper: no imports)."""
    if capsys is not None:
        sample.main(argv)
        captured = capsys.readouterr()
        return captured.out + captured.err
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), *argv], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


@pytest.mark.parametrize("sampler", ["unipc", "lcm"])
def test_both_samplers_write_pngs_and_sidecars(tiny_models, loras, tmp_path, sampler, capsys):
    argv = [
        *model_flags(tiny_models, loras / "align", loras / "reward_list.pt"), "--sampler", sampler, "--prompt", LONG_PROMPT,
        "--height", "64", "--width", "64", "--num_images", "2", "--seed", "7",
    ]  # fmt: skip
    run_sample([*argv, "--out", str(tmp_path / "a")], tmp_path)  # the command line
    run_sample([*argv, "--out", str(tmp_path / "b")], tmp_path, capsys)  # in-process: the same images
    for k in range(2):
        sidecar = json.loads((tmp_path / "a" / f"0000_0{k}.json").read_text())
        assert sidecar["prompt"] == LONG_PROMPT and sidecar["seed"] == 7 + k and sidecar["sampler"] == sampler
        assert sidecar["steps"] == {"unipc": 25, "lcm": 4}[sampler]
        assert sidecar["guidance_scale"] == {"unipc": 7.5, "lcm": 0.0}[sampler]
        assert sidecar["checkpoints"]["init_from"][-1].endswith("reward_list.pt")
        report = sidecar["encoding_report"]
        assert report["segments"] == 16 and report["content_tokens"] > 240 and report["tokens_dropped"] > 0
        a = np.asarray(Image.open(tmp_path / "a" / f"0000_0{k}.png"))
        b = np.asarray(Image.open(tmp_path / "b" / f"0000_0{k}.png"))
        assert a.shape == (64, 64, 3) and np.array_equal(a, b)  # same seed -> identical image
    first = np.asarray(Image.open(tmp_path / "a" / "0000_00.png")).astype(int)
    second = np.asarray(Image.open(tmp_path / "a" / "0000_01.png")).astype(int)
    assert np.abs(first - second).sum() > 0  # seed + k differs


def test_loras_change_the_images(tiny_models, loras, tmp_path, capsys):
    common = [*model_flags(tiny_models), "--sampler", "lcm", "--prompt", "a red circle", "--height", "64", "--width", "64"]
    output = run_sample([*common, "--out", str(tmp_path / "plain")], tmp_path, capsys)
    assert "no --init_from: SD1.5 with the adapter" in output  # --adapter alone drops LongSD's LoRAs: say so
    run_sample([*common, "--init_from", str(loras / "align"), "--out", str(tmp_path / "lora")], tmp_path, capsys)
    plain = np.asarray(Image.open(tmp_path / "plain" / "0000_00.png")).astype(int)
    with_lora = np.asarray(Image.open(tmp_path / "lora" / "0000_00.png")).astype(int)
    assert np.abs(plain - with_lora).sum() > 0


def test_a_stage_trained_with_other_encoder_settings_is_named(tiny_models, loras, tmp_path, caplog):
    stage = tmp_path / "align-final"
    shutil.copytree(loras / "align", stage)
    spelled_otherwise = str(tiny_models["sd15"]) + "/"  # the same folder as this run's
    trained = {"token_length": 120, "segmenter": "sentences", "pretrained_model": spelled_otherwise}
    (stage / "config.json").write_text(json.dumps({"stage": "align", "model": trained}))
    flags = [*small(tiny_models, stage), "--sampler", "lcm", "--out", str(tmp_path / "out")]
    sample.main(flags)
    assert f"{stage} was trained with --token_length 120 (this run: 240)" in caplog.text
    assert "--segmenter" not in caplog.text and "--pretrained_model" not in caplog.text  # the same as this run's
    assert "--sampler lcm: none of the --init_from stages is an lcm stage" in caplog.text  # only an align stage
    with pytest.raises(UserError, match="names '.*' twice"):
        ModelArguments(init_from=[str(stage), str(stage) + "/"])  # its LoRA would be fused twice
    lcm = tmp_path / "lcm-final"
    lcm.mkdir()
    (lcm / "config.json").write_text(json.dumps({"stage": "lcm"}))
    assert lacks_lcm_stage([str(stage)]) and not lacks_lcm_stage([str(stage), str(lcm)])
    assert not lacks_lcm_stage([str(stage), str(loras / "reward_list.pt")])  # of unknown kind: may be an LCM-LoRA


def test_a_stack_unlike_the_one_its_stages_were_trained_in_is_named(tmp_path):
    """A later stage named without the stages it was trained on top of (a reward LoRA alone on
    SD1.5), on top of a stage changed since, and an --adapter that replaces the one a stage folder
    carries, are warned about."""
    from longalign.pipeline import source_digests, stack_warnings

    align, reward = tmp_path / "align" / "final", tmp_path / "reward" / "final"
    for folder, stage, earlier in ((align, "align", []), (reward, "reward", ["runs/align-x/final"])):
        (folder / "adapter").mkdir(parents=True)
        (folder / "adapter" / "adapter.safetensors").write_bytes(b"the align stage's adapter")
        (folder / "config.json").write_text(json.dumps({"stage": stage, "model": {"init_from": earlier}}))
    other = tmp_path / "other_adapter"
    other.mkdir()
    (other / "adapter.safetensors").write_bytes(b"another adapter")

    def warnings(model_args, loras, adapter):
        return stack_warnings(model_args, loras, adapter, source_digests(loras, adapter))

    assert warnings(ModelArguments(), [str(align), str(reward)], str(reward / "adapter")) == []
    assert warnings(ModelArguments(adapter=str(align / "adapter")), [str(align), str(reward)], str(align / "adapter")) == []
    assert warnings(ModelArguments(), [str(reward)], str(reward / "adapter")) == [
        f"{reward} was trained on top of runs/align-x/final, but --init_from puts 0 stage(s) before it"
    ]
    assert warnings(ModelArguments(adapter=str(other)), [str(align), str(reward)], str(other)) == [
        f"--adapter {other} replaces {reward / 'adapter'}, the adapter that stage was trained with"
    ]
    # Each stage records, by content, the stages it was trained on: reward and lcm both on align.
    (align / "pytorch_lora_weights.safetensors").write_bytes(b"align at step 2")
    lcm = tmp_path / "lcm" / "final"
    lcm.mkdir(parents=True)
    (lcm / "pytorch_lora_weights.safetensors").write_bytes(b"lcm")
    for folder, stage in ((reward, "reward"), (lcm, "lcm")):
        recorded = {"stage": stage, "model": {"init_from": ["runs/align-x/final"]}, "weights_sha256": source_digests([str(align)], None)}
        (folder / "config.json").write_text(json.dumps(recorded))
    for stack in ([align, reward], [align, lcm, reward], [align, reward, lcm]):  # wherever align sits before them
        assert warnings(ModelArguments(), [str(folder) for folder in stack], str(reward / "adapter")) == [], stack
    (align / "config.json").write_text(json.dumps({"stage": "align", "model": {"init_from": []}, "resumed": True}))
    (align / "README.md").write_text("a model card rewritten by a resume at the last step: no weight changed")
    assert warnings(ModelArguments(), [str(align), str(reward)], str(reward / "adapter")) == []
    (align / "pytorch_lora_weights.safetensors").write_bytes(b"align after more steps")  # trained further since
    then = recorded["weights_sha256"]["init_from"][0]
    assert warnings(ModelArguments(), [str(align), str(reward)], str(reward / "adapter")) == [
        f"{reward} was trained on top of runs/align-x/final (sha256 {then}), which no stage before it holds: "
        "changed since, or left out"
    ]


def test_empty_prompt_is_unconditional_generation(tiny_models, tmp_path, capsys):
    out = run_sample([*model_flags(tiny_models), "--prompt", "", "--sampler", "lcm", "--height", "64", "--width", "64", "--out", str(tmp_path)], tmp_path, capsys)
    assert "empty: unconditional generation" in out
    assert json.loads((tmp_path / "0000_00.json").read_text())["encoding_report"]["segments"] == 1


def test_prompt_file_one_prompt_per_line(tiny_models, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square. On the left.\n", encoding="utf-8")
    run_sample([*model_flags(tiny_models), "--prompt_file", str(prompts), "--sampler", "lcm", "--height", "64", "--width", "64", "--out", str(tmp_path / "o")], tmp_path, capsys)
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == ["0000_00.png", "0001_00.png"]
    assert json.loads((tmp_path / "o" / "0001_00.json").read_text())["prompt"] == "a blue square. On the left."


def test_rerun_resumes_and_batching_keeps_each_seed(tiny_models, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green star\n", encoding="utf-8")
    common = [*model_flags(tiny_models), "--prompt_file", str(prompts), "--sampler", "lcm", "--height", "64", "--width", "64", "--num_images", "2"]
    one, batched = tmp_path / "one", tmp_path / "batched"
    run_sample([*common, "--out", str(one)], tmp_path)
    run_sample([*common, "--batch_size", "4", "--out", str(batched)], tmp_path, capsys)
    names = sorted(p.name for p in one.glob("*.png"))
    assert len(names) == 6 and names == sorted(p.name for p in batched.glob("*.png"))
    for name in names:  # the same seed per image in a batch of 4 as one at a time (up to float rounding)
        a = np.asarray(Image.open(one / name)).astype(int)
        b = np.asarray(Image.open(batched / name)).astype(int)
        assert np.abs(a - b).max() <= 2, name
    # A run cut off after an image's PNG but before its sidecar: the rerun makes only that image again.
    (batched / "0001_01.json").unlink()
    kept = (batched / "0000_00.png").stat().st_mtime_ns
    out = run_sample([*common, "--batch_size", "4", "--out", str(batched)], tmp_path, capsys)
    assert "5 of 6 image(s) already in" in out and "wrote 1 image(s)" in out
    assert (batched / "0001_01.json").exists() and (batched / "0000_00.png").stat().st_mtime_ns == kept
    respelled = [f"{flag}/./" if i % 2 else flag for i, flag in enumerate(common[:6])] + common[6:]  # the same models
    out = run_sample([*respelled, "--batch_size", "4", "--out", str(batched)], tmp_path, capsys)
    assert "6 of 6 image(s) already in" in out
    # Other settings into the same folder: refused (nothing overwritten) unless --overwrite.
    expect_user_error([*common, "--steps", "2", "--out", str(batched)], capsys, "steps", "--overwrite")
    assert json.loads((batched / "0000_00.json").read_text())["steps"] == 4
    run_sample([*common, "--steps", "2", "--overwrite", "--out", str(batched)], tmp_path, capsys)
    assert {json.loads(p.read_text())["steps"] for p in batched.glob("*.json")} == {2}
    out = run_sample([*common[:-1], "1", "--steps", "2", "--out", str(batched)], tmp_path)  # --num_images 1, a new process
    assert "3 of 3 image(s) already in" in out and "note: 3 other image(s)" in out
    assert "Loading weights" not in out  # nothing to make: no model was loaded


def test_a_stage_retrained_at_the_same_path_is_not_taken_for_the_old_one(tiny_models, loras, tmp_path, capsys):
    """Sidecars record the weights the checkpoints held, not only where they were: images of a stage
    that was trained again into the same folder are not skipped as already made (and a rewritten
    model card alone changes nothing)."""
    from safetensors.torch import load_file, save_file

    stage = tmp_path / "align"
    shutil.copytree(loras / "align", stage)
    argv = [*small(tiny_models, stage), "--steps", "1", "--out", str(tmp_path / "out")]
    run_sample(argv, tmp_path, capsys)
    assert "already in" in run_sample(argv, tmp_path, capsys)  # the same files: skipped
    (stage / "README.md").write_text("a model card a resumed run rewrote; the weights are the same")
    assert "already in" in run_sample(argv, tmp_path, capsys)  # the same weights: still skipped
    weights = stage / "pytorch_lora_weights.safetensors"
    save_file({name: 2 * tensor for name, tensor in load_file(weights).items()}, weights)
    expect_user_error(argv, capsys, "weights_sha256", "--overwrite")
    sidecar = tmp_path / "out" / "0000_00.json"  # as sample.py wrote it before sidecars had the key
    sidecar.write_text(json.dumps({k: v for k, v in json.loads(sidecar.read_text()).items() if k != "weights_sha256"}))
    expect_user_error(argv, capsys, "records no weights_sha256 (an older sample.py wrote it)", "--overwrite")


# -------------------------------------------------------------------------------- bad input
def expect_user_error(argv, capsys, *fragments, main=sample.main):
    """`main` (sample.py's, or a stage script's) must exit 2 with one `error:` line naming the problem
    (no traceback); returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error:"), err
    for fragment in fragments:
        assert fragment in err[-1], err[-1]
    return err[-1]


def small(tiny_models, *init_from):
    return [*model_flags(tiny_models, *init_from), "--prompt", "a cat", "--height", "64", "--width", "64"]


def test_bad_sizes_and_steps(tiny_models, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expect_user_error([*small(tiny_models), "--steps", "0"], capsys, "--steps")
    expect_user_error([*model_flags(tiny_models), "--prompt", "a", "--height", "60"], capsys, "multiples of 8")
    expect_user_error([*small(tiny_models), "--sampler", "euler"], capsys, "unipc")
    expect_user_error([*small(tiny_models), "--dtype", "float64"], capsys, "--dtype")
    expect_user_error([*small(tiny_models), "--batch_size", "0"], capsys, "--batch_size")
    expect_user_error([*small(tiny_models), "--sampeler", "lcm"], capsys, "unknown flag(s) --sampeler lcm")
    expect_user_error([*small(tiny_models), "--sampler", "lcm", "--steps", "51"], capsys, "--steps 51", "at most 50")
    expect_user_error([*small(tiny_models), "--device", "foo"], capsys, "unknown --device 'foo'")
    expect_user_error([*small(tiny_models), "--steps", "999"], capsys, "--steps 999", "at most 500")  # UniPC: a NaN image
    expect_user_error([*small(tiny_models), "--guidance_scale", "nan"], capsys, "--guidance_scale must be a finite")
    expect_user_error([*small(tiny_models), "--seed", str(2**64)], capsys, "--seed must be in")  # torch.Generator overflows
    expect_user_error([*small(tiny_models), "--token_length", "100000"], capsys, "--token_length must be in [1, 1024]")


def test_a_device_this_machine_lacks_is_refused(monkeypatch):
    from longalign.loading import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [check_device(name) for name in ("cuda", "cuda:1", "cpu")] == ["cuda", "cuda:1", "cpu"]
    with pytest.raises(UserError, match=r"^--device cuda:2: this machine has 2 cuda device\(s\); the last is cuda:1$"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda was asked for but CUDA is not available here; use --device cpu"):
        check_device("cuda")
    with pytest.raises(UserError, match="--device meta was asked for but META is not available here"):
        check_device("meta")


def test_out_that_is_a_file_or_not_writable_is_refused(tiny_models, tmp_path, capsys, monkeypatch):
    (tmp_path / "images").write_text("not a folder")
    expect_user_error([*small(tiny_models), "--out", str(tmp_path / "images")], capsys, "is a file, not a folder")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(tmp_path) and real_access(path, mode))
    expect_user_error([*small(tiny_models), "--out", str(tmp_path / "new" / "out")], capsys, f"'{tmp_path}' is not writable")


def test_a_finished_out_may_be_read_only(tiny_models, tmp_path, capsys, monkeypatch):
    """A finished --out is only read, so a rerun into it (now read-only) checks it and returns;
    one with images still to make is refused."""
    out = tmp_path / "out"
    argv = [*small(tiny_models), "--steps", "1", "--out", str(out)]
    run_sample(argv, tmp_path, capsys)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(out) and real_access(path, mode))
    assert "1 of 1 image(s) already in" in run_sample(argv, tmp_path, capsys)
    expect_user_error([*argv, "--num_images", "2"], capsys, f"'{out}' is not writable")


def test_a_file_system_error_is_one_line(tiny_models, tmp_path, capsys, monkeypatch):
    """An OSError the checks could not foresee (no permission as root, a full disk) still ends
    the command with one `error:` line, not a traceback."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out"))

    monkeypatch.setattr(os, "makedirs", refuse)
    expect_user_error([*small(tiny_models), "--out", str(tmp_path / "out")], capsys, "Permission denied", str(tmp_path / "out"))


def test_prompt_file_with_a_byte_order_mark(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\nA dog.\n", encoding="utf-8-sig")  # as Windows Notepad saves it
    args = sample.SampleArguments(prompt_file=str(prompts))
    assert sample.read_prompts(args) == ["a cat", "A dog."]


def test_regenerating_an_image_drops_its_old_sidecar_first(tmp_path, monkeypatch):
    """Cut off between the PNG and the sidecar, an --overwrite run must not leave the new image
    beside the old image's sidecar, which a later run would take for a finished image."""
    stem = str(tmp_path / "0000_00")
    sample.write_image(stem, Image.new("RGB", (8, 8), "red"), {"steps": 4})

    def cut_off(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample.json, "dump", cut_off)
    with pytest.raises(KeyboardInterrupt):
        sample.write_image(stem, Image.new("RGB", (8, 8), "blue"), {"steps": 25})
    assert Image.open(stem + ".png").getpixel((0, 0)) == (0, 0, 255)
    assert not os.path.exists(stem + ".json")  # so the image is redone, not trusted


def test_ctrl_c_outside_the_training_steps_is_one_line_and_exit_130(capsys):
    """Ctrl-C while models load (or while sampling) is one line, not a KeyboardInterrupt traceback."""
    from longalign.loading import cli_entry

    @cli_entry
    def loading_models() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        loading_models()
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted (Ctrl-C)\n"


def test_unreadable_prompt_file(tiny_models, tmp_path, capsys):
    expect_user_error([*model_flags(tiny_models), "--prompt_file", str(tmp_path / "missing.txt")], capsys, "missing.txt")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    expect_user_error([*model_flags(tiny_models), "--prompt_file", str(binary)], capsys, "binary.txt")


def test_missing_and_partial_checkpoints(tiny_models, tmp_path, capsys):
    expect_user_error(small(tiny_models, tmp_path / "no" / "such" / "run"), capsys, "no/such/run")
    partial = tmp_path / "partial_stage"
    (partial / "adapter").mkdir(parents=True)
    expect_user_error(small(tiny_models, partial), capsys, "pytorch_lora_weights.safetensors")
    no_unet = tmp_path / "sd15_without_unet"
    no_unet.mkdir()
    for name in ("tokenizer", "text_encoder", "vae", "scheduler"):
        os.symlink(tiny_models["sd15"] / name, no_unet / name)
    (no_unet / "model_index.json").write_text((tiny_models["sd15"] / "model_index.json").read_text())
    flags = small(tiny_models)
    flags[flags.index("--pretrained_model") + 1] = str(no_unet)
    expect_user_error(flags, capsys, "sd15_without_unet")


def test_unet_folder_with_renamed_weights_is_refused(tiny_models, tmp_path, capsys):
    """diffusers left the missing weights on the meta device and failed later with a traceback."""
    from safetensors.torch import load_file, save_file

    sd15 = tmp_path / "sd15"
    shutil.copytree(tiny_models["sd15"], sd15)
    weights = sd15 / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({f"renamed.{key}": value for key, value in load_file(weights).items()}, weights)
    flags = small(tiny_models)
    flags[flags.index("--pretrained_model") + 1] = str(sd15)
    expect_user_error(flags, capsys, "UNet at", "of UNet2DConditionModel's weights", "damaged")


def test_lora_for_another_unet_is_refused(tiny_models, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(**{**tiny_unet().config, "block_out_channels": (16, 32), "norm_num_groups": 8})
    add_lora(other, "align", LoraSettings(rank=4))
    save_lora(other, tmp_path / "other", "align")
    expect_user_error(small(tiny_models, tmp_path / "other"), capsys, "does not fit")


def test_legacy_file_with_non_tensors_is_refused(tiny_models, tmp_path, capsys):
    torch.save({"not": "a list"}, tmp_path / "dict.pt")
    expect_user_error(small(tiny_models, tmp_path / "dict.pt"), capsys, "dict.pt")
    torch.save([torch.zeros(2, 2), "text"], tmp_path / "mixed.pt")
    expect_user_error(small(tiny_models, tmp_path / "mixed.pt"), capsys, "mixed.pt")


def test_hub_ids_without_hub_access(tiny_models, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flags = small(tiny_models)
    flags[flags.index("--t5_model") + 1] = "google-t5/t5-large"
    expect_user_error(flags, capsys, "google-t5/t5-large", "local folder")
    expect_user_error(["--prompt", "a cat", "--height", "64", "--width", "64"], capsys, "luping-liu/LongSD")


def test_lcm_on_the_released_weights_is_warned_about(capsys, caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub fetch then fails; the warning comes first
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "a cat", "--sampler", "lcm", "--height", "64", "--width", "64"])
    assert "LongSD has no LCM LoRA: --sampler lcm needs an lcm stage in --init_from" in caplog.text
    out, err = capsys.readouterr()
    assert "(--segmenter legacy)" in out and "luping-liu/LongSD" in err  # the split LongSD was trained with
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "a cat", "--segmenter=sentences"])
    assert "(--segmenter sentences)" in capsys.readouterr().out  # unless asked for another
    assert "trained on prompts split by --segmenter legacy; this run splits them by --segmenter sentences" in caplog.text
    caplog.clear()
    with pytest.raises(SystemExit):  # the released files named one by one: the default segmenter is warned about
        sample.main(["--prompt", "a cat", "--adapter", "luping-liu/LongSD/s28750_adapter", "--init_from", "x/lora.pt"])
    assert "luping-liu/LongSD/s28750_adapter was trained on prompts split by --segmenter legacy" in caplog.text
    caplog.clear()
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "a cat", "--init_from", "luping-liu/LongSD/s28750_lora_vis.pt", "--segmenter", "legacy"])
    assert "trained on prompts split" not in caplog.text


def test_released_lcm_sampler_steps_to_the_x0_prediction(monkeypatch):
    """The `lcm` sampler overrides LCMScheduler's boundary scalings with (0, 1); this holds only
    while diffusers' `step` calls the method by that name, which a spy checks."""
    from diffusers import LCMScheduler

    from longalign.pipeline import ReleasedLCMScheduler
    from longalign.tiny import SD15_SCHEDULER

    scheduler = ReleasedLCMScheduler.from_config(dict(SD15_SCHEDULER))
    assert scheduler.get_scalings_for_boundary_condition_discrete(19) == (0.0, 1.0)
    assert LCMScheduler.from_config(dict(SD15_SCHEDULER)).get_scalings_for_boundary_condition_discrete(19) != (0.0, 1.0)
    asked = []
    monkeypatch.setattr(ReleasedLCMScheduler, "get_scalings_for_boundary_condition_discrete", lambda self, t: asked.append(t) or (1.0, 0.0))
    scheduler.set_timesteps(4)
    sample, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    out = scheduler.step(eps, scheduler.timesteps[0], sample, generator=torch.Generator().manual_seed(0))
    assert asked and torch.equal(out.denoised, sample)  # step used the override: denoised = 1 x_t + 0 x0


def test_each_prompt_of_a_batch_conditions_its_own_image(tiny_models):
    """The UNet sees [negative; prompts] under CFG, each row the encoding of its own prompt, in order
    (the images of the tiny model barely differ by prompt, so the sample tests cannot see a mix-up)."""
    from longalign.pipeline import LongPromptPipeline

    pipeline = LongPromptPipeline.from_pretrained(
        str(tiny_models["sd15"]), str(tiny_models["t5"]), str(tiny_models["adapter"]), []
    )
    pipeline.set_sampler("unipc")
    seen = []
    pipeline.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    prompts = ["A red circle on the left.", "A blue square. A green star on the right."]
    pipeline(prompts, "blurry", steps=2, guidance_scale=7.5, height=64, width=64, generator=torch.Generator().manual_seed(0), show_progress=False)
    expected = torch.cat([pipeline.encode(["blurry"])[0].expand(2, -1, -1), *(pipeline.encode([p])[0] for p in prompts)])
    assert len(seen) == 2 and all(torch.allclose(context, expected, atol=1e-5) for context in seen)
    assert not torch.allclose(expected[2], expected[3], atol=1e-3)  # the prompts do encode differently


def test_default_dtype_follows_the_device(monkeypatch):
    """bfloat16 on a GPU that has it (the stages train in bf16), float16 on one that has not,
    float32 on the CPU; --dtype wins. The GPU is faked: only the choice is tested here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for bf16, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        assert sample.resolve_device(sample.SampleArguments()) == ("cuda", expected)
    assert sample.resolve_device(sample.SampleArguments(device="cpu")) == ("cpu", torch.float32)
    assert sample.resolve_device(sample.SampleArguments(dtype="float16")) == ("cuda", torch.float16)


def test_stage_loras_are_fused_in_float32_before_the_cast(tiny_models, loras):
    """A bf16 pipeline holds (W + up @ down) computed in float32 and rounded once, as the stages
    fuse earlier ones before training; fusing in bf16 rounds W, the delta and their sum."""
    from longalign.pipeline import LongPromptPipeline

    def unet_weights(dtype):
        pipeline = LongPromptPipeline.from_pretrained(
            str(tiny_models["sd15"]), str(tiny_models["t5"]), str(tiny_models["adapter"]), [str(loras / "align")], dtype=dtype
        )
        return pipeline.pipe.unet.state_dict()

    full, half = unet_weights(torch.float32), unet_weights(torch.bfloat16)
    assert all(half[name].dtype == torch.bfloat16 and torch.equal(half[name], value.to(torch.bfloat16)) for name, value in full.items())
