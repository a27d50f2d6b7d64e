"""UNet LoRA (METHOD.md §3): targets, init, fp32 training weights, diffusers files, stacking, legacy files."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from longalign.loading import UserError
from longalign.lora import (
    LoraSettings,
    add_lora,
    convert_legacy_lora,
    fuse_stage_loras,
    load_stage_loras,
    lora_target_modules,
    read_lora,
    save_lora,
)
from longalign.tiny import tiny_unet

REPO = Path(__file__).resolve().parents[1]

SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
)


def make_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return tiny_unet().eval()


def unet_inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    encoder_hidden_states = torch.randn(2, 7, 32, generator=generator)
    return latents, torch.tensor([10, 500]), encoder_hidden_states


@torch.no_grad()
def run(unet, inputs=None):
    latents, timesteps, encoder_hidden_states = inputs or unet_inputs()
    return unet(latents, timesteps, encoder_hidden_states).sample


def independent_targets(unet) -> list[str]:
    """The targets spelled out by attribute name, from diffusers' classes (not by the generic walk)."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    names = []
    for prefix, module in unet.named_modules():
        if isinstance(module, ResnetBlock2D):
            parts = ["conv1", "time_emb_proj", "conv2"] + (["conv_shortcut"] if module.conv_shortcut is not None else [])
        elif isinstance(module, Attention):
            parts = ["to_q", "to_k", "to_v", "to_out.0"]
        elif isinstance(module, GEGLU):
            parts = ["proj"]
        else:
            continue
        names += [f"{prefix}.{part}" for part in parts]
    return names


def randomize_lora_b(unet, adapter_name: str, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in unet.named_parameters():
        if f".lora_B.{adapter_name}." in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05


def legacy_list(unet, rank: int, seed: int = 4) -> list[torch.Tensor]:
    """A released-format list [up_0, down_0, ...] written by the METHOD.md rule, in fp16."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for module in unet.modules():
        if type(module).__name__ in ("ResnetBlock2D", "Attention", "GEGLU"):
            for _, layer in module.named_modules():
                if isinstance(layer, nn.Linear):
                    up_shape, down_shape = (layer.out_features, rank), (rank, layer.in_features)
                elif isinstance(layer, nn.Conv2d):
                    up_shape = (layer.out_channels, rank, 1, 1)
                    down_shape = (rank, layer.in_channels, *layer.kernel_size)
                else:
                    continue
                items.append((torch.randn(up_shape, generator=generator) * 0.1).half())
                items.append((torch.randn(down_shape, generator=generator) * 0.1).half())
    return items


def apply_legacy_by_hand(unet, items) -> None:
    """W += up @ down for every pair, in the same walk order."""
    layers = [
        layer
        for module in unet.modules()
        if type(module).__name__ in ("ResnetBlock2D", "Attention", "GEGLU")
        for _, layer in module.named_modules()
        if isinstance(layer, (nn.Linear, nn.Conv2d))
    ]
    assert len(items) == 2 * len(layers)
    with torch.no_grad():
        for layer, up, down in zip(layers, items[0::2], items[1::2]):
            delta = up.float().flatten(1) @ down.float().flatten(1)
            layer.weight += delta.reshape(layer.weight.shape)


# ------------------------------------------------------------------------------------ targets


def test_targets_on_tiny_unet_match_an_independent_enumeration():
    unet = make_unet()
    targets = lora_target_modules(unet)
    expected = independent_targets(unet)
    assert len(targets) == len(expected) == 65
    assert sorted(targets) == sorted(expected)


def test_sd15_unet_has_224_targets():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(SD15_UNET_CONFIG)
    targets = lora_target_modules(unet)
    assert len(targets) == 224 == len(set(targets))
    assert sorted(targets) == sorted(independent_targets(unet))
    last = [name.rsplit(".", 1)[-1] for name in targets]
    counts = {part: last.count(part) for part in ("conv1", "conv2", "time_emb_proj", "conv_shortcut", "to_q", "0", "proj")}
    assert counts == {"conv1": 22, "conv2": 22, "time_emb_proj": 22, "conv_shortcut": 14, "to_q": 32, "0": 32, "proj": 16}


def test_sd15_target_order_is_pinned():
    """The released LoRA files are key-less lists in this order (METHOD.md §3), so a diffusers
    release that registered the UNet's blocks in another order would pair same-shaped tensors with
    the wrong layers without any error: diffusers registers `down_blocks` and `up_blocks` before
    `mid_block`, and in each block its attentions before its resnets."""
    import hashlib

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        targets = lora_target_modules(UNet2DConditionModel.from_config(SD15_UNET_CONFIG))
    blocks = list(dict.fromkeys("mid_block" if name.startswith("mid_block") else ".".join(name.split(".")[:2]) for name in targets))
    assert blocks == [*(f"down_blocks.{i}" for i in range(4)), *(f"up_blocks.{i}" for i in range(4)), "mid_block"]
    attention = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert targets[:4] == [f"{attention}.to_q", f"{attention}.to_k", f"{attention}.to_v", f"{attention}.to_out.0"]
    assert targets[-1] == "mid_block.resnets.1.conv2"
    digest = hashlib.sha256("\n".join(targets).encode()).hexdigest()
    assert digest == "9a0800da02f29196af2b102ae738f57628463ea0ffefceae96f2f0c84aff6ef7"  # the whole list, as of diffusers 0.42


# ------------------------------------------------------------------------------------ training adapter


def test_add_lora_init_and_fp32_params_on_bf16_unet():
    unet = make_unet().to(torch.bfloat16)
    settings = LoraSettings(rank=8)
    params = add_lora(unet, "align", settings)
    targets = lora_target_modules(unet)
    assert len(params) == 2 * len(targets)
    assert all(param.dtype == torch.float32 for param in params)
    trainable = {name for name, param in unet.named_parameters() if param.requires_grad}
    assert len(trainable) == len(params) and all(".lora_A.align." in n or ".lora_B.align." in n for n in trainable)
    assert all(p.dtype == torch.bfloat16 for n, p in unet.named_parameters() if "lora" not in n)
    lora_a = torch.cat([p.flatten() for n, p in unet.named_parameters() if ".lora_A." in n])
    lora_b = torch.cat([p.flatten() for n, p in unet.named_parameters() if ".lora_B." in n])
    assert lora_b.abs().max() == 0
    assert abs(lora_a.std().item() - 1 / settings.rank) < 0.1 / settings.rank
    assert not torch.equal(lora_a, lora_a.bfloat16().float())  # drawn in fp32, not rounded through bf16
    assert unet.peft_config["align"].lora_alpha == settings.rank and unet.peft_config["align"].lora_dropout == 0.0
    latents, timesteps, context = unet_inputs()
    output = run(unet, (latents.bfloat16(), timesteps, context.bfloat16()))
    assert output.dtype == torch.bfloat16 and torch.isfinite(output).all()


def test_lora_dropout_drops_the_branch_output_as_released():
    """METHOD.md §3 / released LoRA layers: W x + dropout(B A x), not peft's B A dropout(x). In train
    mode each element of a layer's LoRA delta is then 0 or (B A x) / (1 - p); in eval mode, B A x."""
    from peft.tuners.lora import LoraLayer

    unet = make_unet()
    add_lora(unet, "align", LoraSettings(rank=4, dropout=0.5))
    randomize_lora_b(unet, "align")
    layers = {type(m.get_base_layer()).__name__: m for m in unet.modules() if isinstance(m, LoraLayer)}
    generator = torch.Generator().manual_seed(5)
    for kind in ("Linear", "Conv2d"):
        layer = layers[kind]
        base, down, up = layer.get_base_layer(), layer.lora_A["align"], layer.lora_B["align"]
        inputs = base.weight.shape[1]
        x = torch.randn((2, inputs, 8, 8) if kind == "Conv2d" else (2, 7, inputs), generator=generator)
        with torch.no_grad():  # B A x without the module calls (a call of `up` runs its dropout)
            branch = nn.functional.conv2d(down(x), up.weight) if kind == "Conv2d" else nn.functional.linear(down(x), up.weight)
            unet.train()
            delta = layer(x) - base(x)
            unet.eval()
            assert torch.allclose(layer(x) - base(x), branch, atol=1e-5), kind
        kept = delta.abs() > 1e-6
        assert 0.3 < kept.float().mean() < 0.7, kind  # about half the output elements dropped
        assert torch.allclose(delta[kept], branch[kept] * 2, atol=1e-5), kind


def test_saved_lora_loads_in_stock_pipeline_exactly(tiny_models, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    sd15 = tiny_models["sd15"]
    unet = UNet2DConditionModel.from_pretrained(sd15, subfolder="unet").eval()
    base = run(unet)
    add_lora(unet, "align", LoraSettings(rank=4, alpha=8))  # scale 2: only right with the metadata
    randomize_lora_b(unet, "align")
    expected = run(unet)
    assert (expected - base).abs().max() > 1e-3
    save_lora(unet, tmp_path / "final", "align")

    pipeline = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None)
    pipeline.load_lora_weights(tmp_path / "final")
    assert (run(pipeline.unet) - expected).abs().max() == 0

    ours = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None)
    load_stage_loras(ours, [tmp_path / "final"], adapter_names=["align"])
    assert (run(ours.unet) - expected).abs().max() == 0


# ------------------------------------------------------------------------------------ stacking


def test_two_stage_loras_stacked_equal_fused(tmp_path):
    trained = make_unet()
    add_lora(trained, "align", LoraSettings(rank=4))
    randomize_lora_b(trained, "align", seed=5)
    add_lora(trained, "reward", LoraSettings(rank=2, alpha=4))
    randomize_lora_b(trained, "reward", seed=6)
    save_lora(trained, tmp_path / "align", "align")
    file = save_lora(trained, tmp_path / "reward", "reward")  # a .safetensors file as a source

    stacked = make_unet()
    base = run(stacked)
    names = load_stage_loras(stacked, [tmp_path / "align", file])
    assert names == ["stage_0", "stage_1"] and set(stacked.active_adapters()) == set(names)
    assert not any(param.requires_grad for name, param in stacked.named_parameters() if "lora" in name)

    fused = make_unet()
    fuse_stage_loras(fused, [tmp_path / "align", file])
    assert not any("lora" in name for name, _ in fused.named_parameters())
    assert (run(stacked) - base).abs().max() > 1e-3
    torch.testing.assert_close(run(fused), run(stacked), atol=1e-5, rtol=0)

    # the fused weights are W + sum over stages of (alpha / r) B @ A
    reference = make_unet()
    align, reward = read_lora(tmp_path / "align"), read_lora(file)
    with torch.no_grad():
        for weights, scale in ((align, 1.0), (reward, 2.0)):
            for key, down in weights.state_dict.items():
                if key.endswith(".lora_A.weight"):
                    module = key[: -len(".lora_A.weight")]
                    up = weights.state_dict[f"{module}.lora_B.weight"]
                    layer = reference.get_submodule(module)
                    layer.weight += scale * (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
    fused_state = fused.state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(fused_state[key], value, atol=1e-6, rtol=0)

    # a new training adapter on top of the stacked stages: only it trains, the stages stay active
    before = run(stacked)
    params = add_lora(stacked, "lcm", LoraSettings(rank=4))
    assert {name.rsplit(".", 2)[-2] for name, p in stacked.named_parameters() if p.requires_grad} == {"lcm"}
    assert len(params) == 2 * len(lora_target_modules(stacked))
    torch.testing.assert_close(run(stacked), before, atol=0, rtol=0)
    latents, timesteps, context = unet_inputs()
    stacked(latents, timesteps, context).sample.square().mean().backward()
    grads = {name: param.grad for name, param in stacked.named_parameters() if "lora" in name}
    assert all(grads[name] is None for name in grads if ".lcm." not in name)
    assert all(grads[name].abs().sum() > 0 for name in grads if ".lora_B.lcm." in name)


def test_missing_file_misfit_and_bad_names_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="invalid LoRA adapter name 'train'"):
        add_lora(make_unet(), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="pytorch_lora_weights.safetensors"):
        load_stage_loras(make_unet(), [tmp_path / "empty"])

    trained = make_unet()
    add_lora(trained, "align", LoraSettings(rank=4))
    save_lora(trained, tmp_path / "align", "align")
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel.from_config({**make_unet().config, "block_out_channels": (32, 48)})
    with pytest.raises(UserError, match=r"does not fit the UNet: module '[\w.]+' \(weight \(\d+"):
        load_stage_loras(other, [tmp_path / "align"])
    assert not getattr(other, "peft_config", {})  # nothing half-loaded


# ------------------------------------------------------------------------------------ legacy files


def test_legacy_list_converts_to_the_by_hand_weights(tmp_path):
    unet = make_unet()
    items = legacy_list(unet, rank=4)
    torch.save(items, tmp_path / "s28750_lora_vis.pt")

    reference = make_unet()
    apply_legacy_by_hand(reference, items)
    expected = run(reference)
    assert (expected - run(unet)).abs().max() > 1e-3

    weights = convert_legacy_lora(str(tmp_path / "s28750_lora_vis.pt"), unet)
    assert weights.config["r"] == weights.config["lora_alpha"] == 4
    assert all(t.dtype == torch.float16 for t in weights.state_dict.values())

    stacked = make_unet()
    load_stage_loras(stacked, [tmp_path / "s28750_lora_vis.pt"])  # converted on the fly
    assert (run(stacked) - expected).abs().max() < 1e-5
    fused = make_unet()
    fuse_stage_loras(fused, [tmp_path / "s28750_lora_vis.pt"])
    assert (run(fused) - expected).abs().max() < 1e-5


@pytest.mark.parametrize(
    "make_items, message",
    [
        (lambda items: {"weights": items}, r"is not a list of tensors \(it holds a dict\)"),
        (lambda items: {"unet.a.lora_A.weight": items[1]}, r"\(it holds a dict; a diffusers-format LoRA loads as it is\)"),
        (lambda items: items[:3] + ["up"] + items[4:], r"item 3 is a str, not a tensor"),
        (lambda items: items[:-2], r"expected 130 tensors \(up and down for 65 modules\), got 128"),
        (
            lambda items: items[:1] + [items[1][:, :-1]] + items[2:],
            r"does not fit UNet module '[\w.]+' \(weight .*\): tensors 0 \(up\) and 1 \(down\) have shapes",
        ),
    ],
    ids=["not-a-list", "diffusers-dict", "non-tensor", "wrong-count", "wrong-shape"],
)
def test_malformed_legacy_files_are_refused(tmp_path, make_items, message):
    unet = make_unet()
    torch.save(make_items(legacy_list(unet, rank=2)), tmp_path / "bad.pt")
    with pytest.raises(UserError, match=message):
        convert_legacy_lora(str(tmp_path / "bad.pt"), unet)


def test_convert_cli_good_and_bad_file(tiny_models, tmp_path):
    unet = make_unet()
    items = legacy_list(unet, rank=4)
    torch.save(items, tmp_path / "good.pt")
    torch.save(items[:-2], tmp_path / "bad.pt")
    command = [sys.executable, "-m", "longalign.convert_lora"]
    env_args = dict(cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    flags = ["--pretrained_model", str(tiny_models["sd15"])]

    good = subprocess.run(command + [str(tmp_path / "good.pt"), str(tmp_path / "out")] + flags, **env_args)
    assert good.returncode == 0, good.stderr
    reference = make_unet()
    apply_legacy_by_hand(reference, items)
    converted = make_unet()
    load_stage_loras(converted, [tmp_path / "out"])
    assert (run(converted) - run(reference)).abs().max() < 1e-5

    bad = subprocess.run(command + [str(tmp_path / "bad.pt"), str(tmp_path / "out2")] + flags, **env_args)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "expected 130 tensors" in lines[0], bad.stderr
    assert not (tmp_path / "out2").exists()

    (tmp_path / "a_file").write_text("x")  # diffusers logs an error, writes nothing; it was reported as written
    into_file = subprocess.run(command + [str(tmp_path / "good.pt"), str(tmp_path / "a_file")] + flags, **env_args)
    assert into_file.returncode == 2 and "is a file, not a folder" in into_file.stderr
    assert (tmp_path / "a_file").read_text() == "x"
