"""What the align and lcm losses feed the UNet, call by call (METHOD.md §5), on the tiny models.

The stage tests check that each stage runs and writes its files; these check the recipe itself: a
recording hook on the UNet sees every call's timesteps, context, gradient mode and LoRA state.
"""

import pytest
import torch
from peft.tuners.lora import LoraLayer

import train_align
import train_lcm
from longalign.config import AlignArguments, LcmArguments, ModelArguments
from longalign.training import make_accelerator


@pytest.fixture
def model_args(tiny_models):
    return ModelArguments(
        pretrained_model=str(tiny_models["sd15"]), t5_model=str(tiny_models["t5"]), adapter=str(tiny_models["adapter"])
    )


def common(tmp_path):
    return dict(output_dir=str(tmp_path / "run"), dataset="unused.jsonl", mixed_precision="no", cpu=True, report_to="none")


def record_unet_calls(unet) -> list[dict]:
    """Every forward of `unet`: timesteps, context, whether gradients are on and the LoRA is active."""
    lora_layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    calls = []

    def hook(module, args, kwargs):
        calls.append(
            dict(
                timesteps=torch.as_tensor(args[1]).clone(), context=kwargs["encoder_hidden_states"].detach().clone(),
                grad=torch.is_grad_enabled(), lora=not lora_layers[0].disable_adapters,
            )
        )  # fmt: skip

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def batch(captions, resolution=64):
    return {"pixel_values": torch.rand(len(captions), 3, resolution, resolution) * 2 - 1, "caption": list(captions)}


def test_lcm_loss_student_at_t_teacher_without_lora_with_cfg_target_at_t_minus_20(tmp_path, model_args):
    args = LcmArguments(**common(tmp_path))
    stage = train_lcm.build_stage(model_args, args, make_accelerator(args))
    calls = record_unet_calls(stage.parts.unet)
    captions = ["A red circle. A blue square.", "A green star."]
    loss, _ = stage.loss_fn(stage.parts, batch(captions), torch.Generator().manual_seed(0))
    assert loss.requires_grad and torch.isfinite(loss)
    student, teacher_cond, teacher_uncond, target = calls
    context, _ = stage.parts.encoder(captions)
    uncond, _ = stage.parts.encoder([""])
    assert student["grad"] and student["lora"] and torch.equal(student["context"], context)
    for teacher in (teacher_cond, teacher_uncond):  # the align model: the same UNet with the lcm LoRA off
        assert not teacher["grad"] and not teacher["lora"] and torch.equal(teacher["timesteps"], student["timesteps"])
    assert torch.equal(teacher_cond["context"], context) and torch.equal(teacher_uncond["context"], uncond.expand(2, -1, -1))
    assert not target["grad"] and target["lora"]  # the student itself, no EMA copy, under no_grad
    assert torch.equal(target["timesteps"], (student["timesteps"] - 20).clamp(min=0))  # t' = t - 1000/50
    assert int(student["timesteps"].min()) >= 10


def test_align_loss_drops_captions_to_the_empty_prompt_and_trains_the_lora(tmp_path, model_args):
    args = AlignArguments(**common(tmp_path), caption_dropout=0.5)
    stage = train_align.build_stage(model_args, args, make_accelerator(args))
    calls = record_unet_calls(stage.parts.unet)
    captions = [f"A red circle number {i}." for i in range(8)]
    _, logs = stage.loss_fn(stage.parts, batch(captions), torch.Generator().manual_seed(0))
    (call,) = calls
    assert call["grad"] and call["lora"] and call["context"].shape[:2] == (8, 480)
    with torch.no_grad():
        encoded = [stage.parts.encoder([caption])[0][0] for caption in captions]
        empty = stage.parts.encoder([""])[0][0]
    dropped = [torch.allclose(row, empty, atol=1e-6) for row in call["context"]]
    kept = [torch.allclose(row, enc, atol=1e-6) for row, enc in zip(call["context"], encoded)]
    assert all(d != k for d, k in zip(dropped, kept))  # each row is its caption's encoding or the empty prompt's
    assert 0 < sum(dropped) < 8 and logs["caption_dropped"] == sum(dropped) / 8
    assert call["timesteps"].min() >= 0 and call["timesteps"].max() < 1000
