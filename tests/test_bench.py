"""bench/run.py cannot rot: one tiny run of every stage as a subprocess, plus its helpers (issue 6).

No timing is asserted (DESIGN.md: timing targets live in bench/); the checks are on what the
benchmark reports: the fields, FLOP counts that follow from the shapes, and the GPU peak table.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import (
    ABLATIONS_CHANGING_FLOPS,
    ALIGN_ABLATIONS,
    Recorder,
    align_ablation,
    flop_counter,
    flops_by_module,
    make_batch,
    markdown,
    peak_bf16_tflops,
)

STEP_FIELDS = (
    "name", "stage", "variant", "size", "device", "resolution", "batch_size", "status", "warmup", "steps",
    "step_time_median_s", "step_time_min_s", "samples_per_s", "peak_memory_gib", "memory_kind",
    "unet_flops_per_step", "total_flops_per_step",
)  # fmt: skip
# Rows that count no FLOPs: ablations that change how ops run, not which; the all-50 row without checkpoints.
NO_FLOPS = {"reward_all50_nockpt", *(f"align_{kind}" for kind in set(ALIGN_ABLATIONS) - ABLATIONS_CHANGING_FLOPS)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One timed step per stage on the tiny models (reward rollout shortened to 10 DDIM steps)."""
    out = tmp_path_factory.mktemp("bench") / "results.json"
    out.write_text(json.dumps([{"earlier": "run", "results": []}]))  # the run is appended, earlier runs kept
    command = [
        sys.executable, str(ROOT / "bench" / "run.py"), "--size", "tiny", "--stage", "all",
        "--steps", "1", "--warmup", "0", "--reward-steps", "10", "--threads", "1", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-4000:]
    runs = json.loads(out.read_text())
    return runs, result.stdout


def test_tiny_run_reports_every_stage(tiny_run):
    runs, stdout = tiny_run
    assert len(runs) == 2 and runs[0] == {"earlier": "run", "results": []}
    run = runs[1]
    assert run["machine"]["cpu"] and run["machine"]["versions"]["torch"] == torch.__version__
    assert run["date"] and run["command"].startswith("python bench/run.py --size tiny")
    results = {r["name"]: r for r in run["results"]}
    expected = {"align", "align_ctx77", "lcm", "reward", "reward_all50", "reward_all50_nockpt", "reward_lcm", "sample_lcm4", "sample_unipc25_cfg"}
    expected |= {f"align_{kind}" for kind in ALIGN_ABLATIONS}
    assert set(results) == expected
    # fp32 on a CPU: there is no autocast to take away, and the run says so instead of timing a copy
    skipped = results.pop("align_no_autocast")
    assert skipped["status"] == "not_applicable" and "mixed precision 'no'" in skipped["note"]
    for name, record in results.items():
        assert record["status"] == "ok", (name, record.get("error"))
        missing = [key for key in STEP_FIELDS if key not in record and not (name in NO_FLOPS and "flops" in key)]
        assert not missing, (name, missing)
        assert 0 < record["step_time_min_s"] <= record["step_time_median_s"]
        assert record["samples_per_s"] == pytest.approx(record["batch_size"] / record["step_time_median_s"], rel=1e-3)
        assert record["peak_memory_gib"] > 0 and record["memory_kind"] == "peak_rss"
        if name in NO_FLOPS:
            assert "unet_flops_per_step" not in record, name
        else:
            assert 0 < record["unet_flops_per_step"] <= record["total_flops_per_step"], name
    # the long comparisons come after every stage's own row (a time limit cuts them first)
    order = [r["name"] for r in run["results"]]
    assert order.index("sample_unipc25_cfg") < order.index("reward_all50") < order.index("align_no_lora")
    assert "| align |" in stdout and "| comparison | ratio |" in stdout


def test_tables_reprinted_from_the_results_file(tiny_run, tmp_path, capsys):
    """A run a time limit cut off still has its rows in the JSON; --table prints them."""
    from bench.run import main

    path = tmp_path / "results.json"
    path.write_text(json.dumps(tiny_run[0]))
    assert main(["--table", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| align |" in printed and "| comparison | ratio |" in printed
    path.write_text("[]")
    with pytest.raises(SystemExit, match="holds no bench/run.py results"):
        main(["--table", str(path)])


def test_flop_counts_follow_the_shapes(tiny_run):
    """FLOPs that must come out of the counter if it sees every UNet call."""
    run = tiny_run[0][1]
    results = {r["name"]: r for r in run["results"]}
    # A 480-token context costs more cross-attention than SD's 77 tokens; nothing else changes in the UNet.
    assert results["align"]["unet_flops_per_step"] > results["align_ctx77"]["unet_flops_per_step"]
    # Backprop through all 10 rollout steps (checkpointed: recomputed forward) costs more than through 5.
    assert results["reward_all50"]["unet_flops_per_step"] > results["reward"]["unet_flops_per_step"]
    # UniPC 25 steps with CFG (batch 2B per call) vs LCM 4 steps (batch B): 25 * 2 / 4 = 12.5 times the UNet FLOPs.
    ratio = results["sample_unipc25_cfg"]["unet_flops_per_step"] / results["sample_lcm4"]["unet_flops_per_step"]
    assert ratio == pytest.approx(12.5, rel=1e-3)
    comparisons = {c["name"]: c for c in run["comparisons"]}
    for name in ("context_480_vs_77", "reward_all50_vs_5of50", "reward_all50_nockpt_vs_5of50", "sample_unipc25_vs_lcm4"):
        assert comparisons[name]["ratio"] is not None and comparisons[name]["ratio"] > 0, name
    # Disabling the LoRA removes its FLOPs (the other ablations are not counted: they change no op).
    assert results["align_no_lora"]["unet_flops_per_step"] < results["align"]["unet_flops_per_step"]
    for kind in ("no_lora_dropout", "no_lora_input_cast", "lora_lean", "channels_last"):
        comparison, record = comparisons[f"align_{kind}_vs_align"], results[f"align_{kind}"]
        # against the step as trained timed just before the ablation, not against the first align row
        assert comparison["ratio"] == pytest.approx(
            record["step_time_median_s"] / record["reference_step_time_median_s"], abs=1e-4
        ), kind
    shares = comparisons["align_frozen_encoders"]
    assert shares["status"] == "ok" and set(shares["seconds"]) == {"vae_encode", "segment_clip", "t5_large"}
    assert shares["share"]["total"] == pytest.approx(sum(shares["seconds"].values()) / shares["align_step_s"], rel=1e-2)


def test_flop_counter_counts_cpu_attention():
    """SDPA's CPU kernel is not in torch's FLOP registry; the benchmark's counter adds it (fwd: 2 bmm)."""
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    with flop_counter() as counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    forward = flops_by_module(counter)["total"]
    assert forward == 2 * (2 * 2 * 8 * 4 * 8)
    with flop_counter() as counter:
        out.sum().backward()
    assert flops_by_module(counter)["total"] > forward


def test_bench_batches_are_the_dataloaders_with_segments():
    """The timed step gets what run_training's DataLoader gives: captions, images, and segments
    already split (so the split is not timed), or none without a splitter (the 77-token row)."""
    from longalign.text_encoding import split_legacy

    batch = make_batch("align", 3, 64, seed=0, split_caption=split_legacy)
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and len(batch["caption"]) == 3
    assert batch["segments"] == [split_legacy(caption) for caption in batch["caption"]]
    assert len(batch["segments"][0]) > 5  # long captions: many segments
    reward = make_batch("reward", 2, 64, seed=0)
    assert "pixel_values" not in reward and "segments" not in reward


def test_align_ablations_take_effect_and_are_undone(tiny_models):
    """Each ablation changes what it names inside the block, and the UNet is as before after it."""
    from diffusers import UNet2DConditionModel
    from peft.tuners.lora import LoraLayer

    from longalign.lora import LoraSettings, add_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_models["sd15"], subfolder="unet").to(torch.bfloat16)
    params = add_lora(unet, "align", LoraSettings(rank=4))
    unet.train()
    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    ups = [layer.lora_B["align"] for layer in layers]
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad is False)

    def state() -> tuple:
        return (
            [type(up.branch_dropout).__name__ for up in ups],
            [layer.cast_input_dtype_enabled for layer in layers],
            [layer.disable_adapters for layer in layers],
            [p.requires_grad for p in unet.parameters()],
            conv.weight.is_contiguous(),
            torch.backends.cudnn.benchmark,
        )

    before = state()
    assert set(before[0]) == {"Dropout"} and all(before[1]) and not any(before[2]) and before[4]
    for kind in set(ALIGN_ABLATIONS) - {"no_autocast"}:
        with align_ablation(unet, kind):
            dropouts, casts, disabled, grads, contiguous, _ = state()
            assert (set(dropouts) == {"Identity"}) == (kind in ("no_lora_dropout", "lora_lean")), kind
            assert (not any(casts)) == (kind in ("no_lora_input_cast", "lora_lean")), kind
            assert all(disabled) == (kind == "no_lora") and (not any(p.requires_grad for p in params)) == (kind == "no_lora"), kind
            assert conv.weight.is_contiguous(memory_format=torch.channels_last) == (kind == "channels_last"), kind
            assert contiguous == (kind != "channels_last"), kind
        assert state() == before, kind
    with pytest.raises(ValueError, match="unknown align ablation"):
        with align_ablation(unet, "no_such"):
            pass
    with pytest.raises(ValueError, match="does not apply"):
        with align_ablation(unet, "no_autocast"):
            pass


def test_no_autocast_ablation_unwraps_accelerates_forward(tiny_models):
    """Under the ablation the prepared UNet runs in its own dtype; after it, accelerate's autocast again."""
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_models["sd15"], subfolder="unet").to(torch.bfloat16)
    config = unet.config
    sample = torch.randn(1, config.in_channels, 8, 8, dtype=torch.bfloat16)
    context = torch.randn(1, 77, config.cross_attention_dim, dtype=torch.bfloat16)
    unet = Accelerator(cpu=True, mixed_precision="bf16").prepare(unet)  # (conftest: a fresh accelerate state)

    def output_dtype() -> torch.dtype:
        with torch.no_grad():
            return unet(sample, 1, encoder_hidden_states=context).sample.dtype

    assert output_dtype() == torch.float32  # accelerate's wrapper: autocast, outputs to fp32
    with align_ablation(unet, "no_autocast"):
        assert output_dtype() == torch.bfloat16
    assert output_dtype() == torch.float32


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA GeForce RTX 4090", 165.0),
        ("NVIDIA A10G", None),
        ("Tesla T4", None),
    ],
)
def test_peak_table(name, tflops):
    assert peak_bf16_tflops(name)[0] == tflops


def test_recorder_appends_and_rewrites(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"run": 1, "results": []}]))
    run = {"results": [], "comparisons": []}
    recorder = Recorder(path, run)
    recorder.add("results", {"name": "align", "status": "oom", "error": "OutOfMemoryError", "batch_size": 16, "resolution": 512})
    recorder.add("results", {"name": "lcm", "status": "ok", "batch_size": 16, "resolution": 512, "step_time_median_s": 0.5})
    saved = json.loads(path.read_text())
    assert saved[0] == {"run": 1, "results": []} and [r["name"] for r in saved[1]["results"]] == ["align", "lcm"]
    table = markdown(run)
    assert "| align | 16 | 512 |" in table and "| oom |" in table


def test_bad_out_device_and_models_are_refused_before_anything_runs(tmp_path, capsys):
    """A file bench/run.py did not write is never its --out (a dataset named by mistake stays as it
    was); a device torch does not know and a --models that is a file get one line each."""
    from bench.run import main

    dataset = tmp_path / "train.jsonl"
    dataset.write_text('{"path": "a.png", "caption": "a cat"}\n{"path": "b.png", "caption": "a dog"}\n')
    other_json = tmp_path / "other.json"
    other_json.write_text('{"lr": 3e-5}')
    tiny = ["--size", "tiny", "--stage", "align", "--steps", "1", "--warmup", "0", "--no-compare", "--no-flops"]
    for argv, fragment in [
        ([*tiny, "--out", str(dataset)], "is not a results file of bench/run.py"),
        ([*tiny, "--out", str(other_json)], "is not a results file of bench/run.py"),
        ([*tiny, "--device", "foo"], "unknown --device 'foo'"),
        ([*tiny, "--models", str(dataset)], "is a file, not a folder"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and err[-1].startswith("error:") and fragment in err[-1], err
    assert dataset.read_text().startswith('{"path": "a.png"') and other_json.read_text() == '{"lr": 3e-5}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json", "train.jsonl"]  # no backup, no .tmp


def test_models_written_by_an_earlier_run_may_be_read_only(tmp_path, monkeypatch):
    """--models is written only when it lacks the models of --size: a read-only folder holding
    them is accepted, one that still needs them is refused before any model is written."""
    from bench.run import parse_options
    from longalign.loading import UserError

    models = tmp_path / "models"
    models.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(models) and real_access(path, mode))
    tiny = ["--size", "tiny", "--stage", "align", "--device", "cpu", "--models", str(models)]
    with pytest.raises(UserError, match="is not writable"):
        parse_options(tiny)
    (models / "bench_models.json").write_text(json.dumps({"size": "tiny"}))  # what ensure_models leaves
    assert parse_options(tiny)[1].models == str(models)
    (models / "bench_models.json").write_text("{cut off")  # a damaged marker: the models are written again
    with pytest.raises(UserError, match="is not writable"):
        parse_options(tiny)
    (models / "bench_models.json").write_text(json.dumps({"size": "tiny"}))
    with pytest.raises(UserError, match="is not writable"):  # the sd15 models would be written there
        parse_options(["--size", "sd15", *tiny[2:]])


def test_random_weights_never_overwrite_a_real_model_folder(tmp_path, capsys):
    """`python -m longalign.tiny DIR` and bench/run.py --models DIR write random weights: into a
    folder holding a real download they would replace it without a word."""
    from longalign import tiny
    from longalign.loading import UserError

    real = tmp_path / "models" / "sd15" / "unet"
    real.mkdir(parents=True)
    (real / "config.json").write_text('{"real": true}')
    with pytest.raises(SystemExit) as exit_info:
        tiny.main([str(tmp_path / "models")])
    assert exit_info.value.code == 2 and "holds files this tool did not write" in capsys.readouterr().err
    assert (real / "config.json").read_text() == '{"real": true}'
    from bench.models import ensure_models

    with pytest.raises(UserError, match="holds files this tool did not write"):
        ensure_models("tiny", tmp_path / "models")
    tiny.write_tiny_models(tmp_path / "ours")
    tiny.write_tiny_models(tmp_path / "ours")  # its own folders: written again
    bench = tmp_path / "bench"  # bench's own full-size folders, replaced by tiny ones
    (bench / "sd15" / "unet").mkdir(parents=True)
    (bench / "sd15" / "unet" / "config.json").write_text("{}")
    (bench / "bench_models.json").write_text(json.dumps({"size": "sd15"}))
    assert ensure_models("tiny", bench)["sd15"] == bench / "sd15"


def run_gpu_table(tmp_path: Path, *flags: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """bench/gpu_table.sh, the one command of a GPU session, on the tiny models on this CPU."""
    out = tmp_path / "out"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OUT": str(out), "WHEELS": str(tmp_path / "no_wheels"), "PYTHON": sys.executable, **env}
    command = ["bash", str(ROOT / "bench" / "gpu_table.sh"), "300", "--size", "tiny", "--device", "cpu", "--threads", "1", *flags]
    result = subprocess.run(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400, check=False)
    return result, out


def test_gpu_table_script_writes_its_files(tmp_path):
    result, out = run_gpu_table(tmp_path, "--stage", "lcm", "--steps", "1", "--warmup", "0", "--no-flops")
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"torch {torch.__version__}" in (out / "preflight.txt").read_text()
    assert (out / "gpu.txt").exists() and "lcm: median" in (out / "log.txt").read_text()
    assert "| lcm | 2 | 64 |" in (out / "table.md").read_text()
    assert [r["name"] for r in json.loads((out / "results.json").read_text())[-1]["results"]] == ["lcm"]


def test_gpu_table_script_stops_in_seconds_when_an_import_fails(tmp_path):
    """A broken environment on the GPU machine fails the preflight: exit 3, nothing measured."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "peft.py").write_text("raise ImportError('peft is broken here')\n")
    result, out = run_gpu_table(tmp_path, "--stage", "lcm", PYTHONPATH=str(broken))
    assert result.returncode == 3, result.stdout[-3000:]
    assert "peft is broken here" in result.stdout and "preflight failed" in result.stdout
    assert not (out / "results.json").exists()


def test_no_measurement_starts_past_the_deadline(tmp_path):
    """`--deadline-s`: rows not started in time are results (`skipped_time`), and the run succeeds."""
    from bench.run import main

    out = tmp_path / "results.json"
    flags = ["--size", "tiny", "--stage", "lcm", "--device", "cpu", "--threads", "1", "--deadline-s", "0", "--out", str(out)]
    assert main(flags) == 0
    [record] = json.loads(out.read_text())[-1]["results"]
    assert record["name"] == "lcm" and record["status"] == "skipped_time" and "step_time_median_s" not in record


def test_the_gpu_tables_bf16_path_runs_on_this_cpu(tmp_path):
    """The GPU table runs bf16 under accelerate's autocast, which CI (no GPU) never does otherwise:
    `--precision bf16` runs that path here, align with its ablations (no_autocast needs autocast)."""
    out = tmp_path / "results.json"
    command = [
        sys.executable, str(ROOT / "bench" / "run.py"), "--size", "tiny", "--stage", "align", "--steps", "1", "--warmup", "0",
        "--threads", "1", "--device", "cpu", "--precision", "bf16", "--no-flops", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:]
    run = json.loads(out.read_text())[-1]
    assert run["settings"]["mixed_precision"] == "bf16"
    results = {r["name"]: r for r in run["results"]}
    assert set(results) == {"align", "align_ctx77", *(f"align_{kind}" for kind in ALIGN_ABLATIONS)}
    assert all(r["status"] == "ok" for r in results.values()), {n: r.get("error", r.get("note")) for n, r in results.items()}
    assert results["align"]["precision"].startswith("bf16")
