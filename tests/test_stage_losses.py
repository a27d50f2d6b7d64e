"""What the align, lcm and reward losses feed the UNet and compute, call by call (METHOD.md §5),
on the tiny models.

The stage tests check that each stage runs and writes its files; these check the recipe itself: a
recording hook on the UNet sees every call's timesteps, context, gradient mode, LoRA state, input
and output, from which each loss value is recomputed by hand.
"""

import pytest
import torch
from peft.tuners.lora import LoraLayer

import train_align
import train_lcm
import train_reward
from longalign import diffusion
from longalign.config import AlignArguments, LcmArguments, ModelArguments, RewardArguments
from longalign.training import encode_images, make_accelerator


@pytest.fixture
def model_args(tiny_models):
    return ModelArguments(
        pretrained_model=str(tiny_models["sd15"]), t5_model=str(tiny_models["t5"]), adapter=str(tiny_models["adapter"])
    )


def common(tmp_path):
    return dict(output_dir=str(tmp_path / "run"), dataset="unused.jsonl", mixed_precision="no", cpu=True, report_to="none")


def record_unet_calls(unet) -> list[dict]:
    """Every forward of `unet`: timesteps, context, whether gradients are on and the LoRA is active,
    and its input sample and output (float32 copies)."""
    lora_layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    calls = []

    def hook(module, args, kwargs, output):
        calls.append(
            dict(
                timesteps=torch.as_tensor(args[1]).clone(), context=kwargs["encoder_hidden_states"].detach().clone(),
                grad=torch.is_grad_enabled(), lora=not lora_layers[0].disable_adapters,
                sample=args[0].detach().float().clone(), out=output.sample.detach().float().clone(),
            )
        )  # fmt: skip

    unet.register_forward_hook(hook, with_kwargs=True)
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


def test_lcm_loss_is_the_consistency_distance_to_the_guided_teacher_step(tmp_path, model_args, monkeypatch):
    args = LcmArguments(**common(tmp_path))
    stage = train_lcm.build_stage(model_args, args, make_accelerator(args))
    start = torch.tensor([15, 519])  # 15 -> t' = 0, where the target must be x_t' itself (c_skip 1, c_out 0)
    monkeypatch.setattr(train_lcm, "sample_lcm_timesteps", lambda *a, **k: (start, (start - 20).clamp(min=0)))
    calls = record_unet_calls(stage.parts.unet)
    loss, _ = stage.loss_fn(stage.parts, batch(["A red circle. A blue square.", "A green star."]), torch.Generator().manual_seed(0))
    student, cond, uncond, target = calls
    alphas = stage.parts.noise_scheduler.alphas_cumprod
    t, t_prev = student["timesteps"], target["timesteps"]
    assert torch.equal(cond["sample"], student["sample"]) and torch.equal(uncond["sample"], student["sample"])
    x_prev = diffusion.lcm_teacher_step(cond["out"], uncond["out"], student["sample"], t, t_prev, alphas, "epsilon", 7.5)
    torch.testing.assert_close(target["sample"], x_prev, rtol=1e-5, atol=1e-6)  # the target starts from the teacher's step

    def denoised(call, timesteps):
        x0 = diffusion.predict_x0(call["out"], call["sample"], timesteps, alphas)
        return diffusion.lcm_output(x0, call["sample"], timesteps)

    prediction, consistency_target = denoised(student, t), denoised(target, t_prev)
    torch.testing.assert_close(consistency_target[0], target["sample"][0], rtol=0, atol=1e-6)  # boundary condition at t' = 0
    torch.testing.assert_close(loss.detach(), diffusion.pseudo_huber(prediction, consistency_target, 0.001), rtol=1e-5, atol=1e-7)


def test_align_loss_is_mse_to_the_noise_at_uniform_timesteps(tmp_path, model_args, monkeypatch):
    args = AlignArguments(**common(tmp_path), caption_dropout=0.0)
    stage = train_align.build_stage(model_args, args, make_accelerator(args))
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(train_align, "encode_images", lambda vae, pixels, generator: latents.clone())
    ranges = []
    sample_timesteps = train_align.sample_timesteps
    monkeypatch.setattr(train_align, "sample_timesteps", lambda n, g, low, high: ranges.append((low, high)) or sample_timesteps(n, g, low, high))
    calls = record_unet_calls(stage.parts.unet)
    loss, logs = stage.loss_fn(stage.parts, batch([f"A red circle number {i}." for i in range(8)]), torch.Generator().manual_seed(0))
    (call,) = calls
    assert ranges == [(0, 1000)] and logs["caption_dropped"] == 0.0
    alpha = stage.parts.noise_scheduler.alphas_cumprod[call["timesteps"]].view(-1, 1, 1, 1)
    noise = (call["sample"] - alpha.sqrt() * latents) / (1 - alpha).sqrt()  # what x_t was noised with
    assert abs(noise.mean()) < 0.1 and 0.9 < noise.std() < 1.1  # standard normal, not the latents
    torch.testing.assert_close(loss.detach(), diffusion.mse(call["out"], noise), rtol=1e-4, atol=1e-6)


def test_encode_images_samples_and_scales_the_latents(tiny_models):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_models["sd15"], subfolder="vae")
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        distribution = vae.encode(pixels).latent_dist
    noise = torch.randn(distribution.mean.shape, generator=torch.Generator().manual_seed(0))
    expected = (distribution.mean + distribution.std * noise) * vae.config.scaling_factor
    torch.testing.assert_close(encode_images(vae, pixels, torch.Generator().manual_seed(0)), expected)


def test_reward_loss_scores_the_decoded_last_x0_in_0_1(tmp_path, tiny_models, model_args, monkeypatch):
    args = RewardArguments(**common(tmp_path), reward_model=str(tiny_models["preference"]), resolution=32)
    stage = train_reward.build_stage(model_args, args, make_accelerator(args))
    seen = {}
    rollout = diffusion.ddim_cfg_rollout

    def recording_rollout(*a, **k):
        seen["x0"] = rollout(*a, **k).x0
        return diffusion.RolloutOutput(seen["x0"], [], [])

    def recording_reward(images, captions, *rest, **options):  # the reward's other arguments do not matter here
        seen["images"] = images
        return images.mean(), {}

    monkeypatch.setattr(train_reward, "get_rollout", lambda name: recording_rollout)
    settings = diffusion.RolloutSettings(rollout_steps=10, grad_steps=1)
    train_reward.reward_loss(stage.parts, {"caption": ["A red circle.", "A dog."]}, torch.Generator().manual_seed(0), args, recording_reward, settings)
    vae = stage.parts.vae
    with torch.no_grad():
        expected = ((vae.decode(seen["x0"] / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(seen["images"].detach(), expected, rtol=1e-5, atol=1e-6)


def test_reward_stage_runs_the_rollout_its_flags_set(tmp_path, tiny_models, model_args):
    """--rollout_steps / --grad_steps / --grad_stride reach the rollout the stage's loss runs."""
    args = RewardArguments(
        **common(tmp_path), reward_model=str(tiny_models["preference"]), resolution=32, rollout_steps=10, grad_steps=2, grad_stride=5
    )  # fmt: skip
    stage = train_reward.build_stage(model_args, args, make_accelerator(args))
    calls = record_unet_calls(stage.parts.unet)
    loss, _ = stage.loss_fn(stage.parts, {"caption": ["A red circle.", "A dog."]}, torch.Generator().manual_seed(0))
    assert loss.requires_grad
    assert [int(call["timesteps"][0]) for call in calls] == list(range(999, 0, -100))  # 10 DDIM steps
    grad = [index for index, call in enumerate(calls) if call["grad"]]
    assert len(grad) == 2 and grad[1] - grad[0] == 5 and grad[0] < 5


@pytest.mark.parametrize("stage_name", ["align", "lcm", "reward"])
def test_each_loss_encodes_the_segments_the_dataloader_split(tmp_path, tiny_models, model_args, stage_name):
    """A batch's `segments` (split in the DataLoader workers) are what CLIP encodes, as given: here
    every caption's are "A green star.", so the CLIP half of each context is that sentence's; T5
    reads the caption itself. A caption dropped by align is encoded as "" (not its segments)."""
    captions = [f"A red circle number {i}." for i in range(8)]
    if stage_name == "align":
        args, script = AlignArguments(**common(tmp_path), caption_dropout=0.5, resolution=64), train_align
    elif stage_name == "lcm":
        args, script = LcmArguments(**common(tmp_path), resolution=64), train_lcm
    else:
        args = RewardArguments(**common(tmp_path), reward_model=str(tiny_models["preference"]), resolution=32, rollout_steps=10, grad_steps=1)
        script = train_reward
    stage = script.build_stage(model_args, args, make_accelerator(args))
    calls = record_unet_calls(stage.parts.unet)
    given = batch(captions, args.resolution) | {"segments": [["A green star."]] * len(captions)}
    stage.loss_fn(stage.parts, given, torch.Generator().manual_seed(0))
    context = calls[0]["context"][: len(captions)]  # the reward rollout's first call: [cond; uncond]
    clip_rows = stage.parts.encoder.token_length
    with torch.no_grad():
        star, _ = stage.parts.encoder(["A green star."])
        plain, _ = stage.parts.encoder(captions)
        empty, _ = stage.parts.encoder([""])
    expected = torch.cat([star[:, :clip_rows].expand(len(captions), -1, -1), plain[:, clip_rows:]], dim=1)
    kept = [torch.allclose(row, want, atol=1e-6) for row, want in zip(context, expected)]
    dropped = [torch.allclose(row, empty[0], atol=1e-6) for row in context]
    assert all(k != d for k, d in zip(kept, dropped))  # each row: the given segments', or ""'s when dropped
    assert (0 < sum(dropped) < len(captions)) if stage_name == "align" else not any(dropped)
