"""Models of the toy long-prompt world (issue 7): configs, training loops, folders, sampling.

- `toy_clip_config`, `toy_unet`, `toy_vae`, `TOY_SCHEDULER`: the tiny architectures (CLIP width 64,
  VAE scale factor 4 so 32 px images give 8x8x4 latents, SD1.5's noise schedule with
  v-prediction, which gives clean samples after far fewer steps than epsilon on this world).
- `train_toy_clip`: a transformers `CLIPModel` trained contrastively on (image, a random subset of
  its object sentences) pairs. Its text tower is the SD-layout `text_encoder`, the whole model is
  the preference model (paper §4) of the toy world.
- `train_toy_vae`: a diffusers `AutoencoderKL` trained to near-lossless reconstruction of toy
  images (flat colours: easy), so the stages' own loader (`AutoencoderKL.from_pretrained`) reads
  it unchanged. Its `scaling_factor` is set to 1 / std of the latents.
- `write_model_folders`: the `sd15`, `t5`, `adapter`, `preference` folders in the real layouts.
- `train_base_unet`: the toy's "SD1.5": a full UNet trained from scratch with standard 77-token
  (truncated, plain CLIP) conditioning — the project's stages only train LoRAs.
- `PlainPromptEncoder`, `ddim_sample`, `generate`: evaluation sampling (DDIM with CFG, built on
  `longalign.diffusion`) for the base model and for stage outputs alike.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion import ddim_step, ddim_timesteps, guided, predict_x0_and_eps
from .tiny import SD15_SCHEDULER

TEXT_WIDTH = 64
LATENT_CHANNELS = 4
VAE_SCALE = 4  # 32 px -> 8x8 latents
TOY_SCHEDULER = {**SD15_SCHEDULER, "prediction_type": "v_prediction"}
T5_WIDTH = 32


# ------------------------------------------------------------------------------ architectures
def toy_clip_config(tokenizer) -> Any:
    """A tiny `CLIPConfig`: text width 64 (2 layers, 77 positions, the word vocabulary, pooling at
    the first `<eot>`), vision ViT on 32 px with 4 px patches (width 64, 3 layers), projection 64."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    sot, eot = tokenizer("")["input_ids"]
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_WIDTH, hidden_act="quick_gelu",
        bos_token_id=sot, eos_token_id=eot, pad_token_id=eot,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=TEXT_WIDTH, hidden_act="quick_gelu",
    )  # fmt: skip
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=TEXT_WIDTH)


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 50, floor: float = 0.0):
    """LR factor: linear warmup over `warmup` steps, then cosine decay to `floor` at `steps`."""

    def factor(step: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))
        return min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * cosine)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def toy_unet() -> Any:
    """The toy "SD1.5" UNet: `UNet2DConditionModel` on 8x8x4 latents, widths (64, 128), cross-attention
    in every block (width 64 = the toy CLIP), SD1.5's block types otherwise."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=16,
        norm_num_groups=16,
    )


def toy_vae() -> Any:
    """An `AutoencoderKL` with three levels (scale factor 4: 32 px -> 8x8x4 latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=32,
        scaling_factor=1.0,
    )


def _log_every(log: Callable[[str], None] | None, what: str, step: int, steps: int, start: float, **values: float) -> None:
    if log is not None and (step == 1 or step == steps or step % max(steps // 10, 1) == 0):
        shown = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        log(f"{what} step {step}/{steps} {shown} ({time.time() - start:.0f}s)")


# ------------------------------------------------------------------------------ toy CLIP
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, 32, 32) in [0, 1] -> CLIP-normalised pixel values (what the preference model feeds)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean.to(images)) / std.to(images)


def object_sentence_subset(scene, generator: torch.Generator) -> str:
    """A random non-empty subset of the scene's object sentences, in random order, as one text."""
    from .toyworld import object_sentence

    n = len(scene.objects)
    k = 1 + int(torch.randint(0, n, (1,), generator=generator))
    chosen = torch.randperm(n, generator=generator)[:k].tolist()
    templates = torch.randint(0, 4, (k,), generator=generator).tolist()
    return " ".join(object_sentence(scene.objects[i], t) for i, t in zip(chosen, templates))


def train_toy_clip(
    scenes: Sequence,
    tokenizer,
    steps: int = 1500,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> Any:
    """Train the toy `CLIPModel` contrastively (CLIP's symmetric InfoNCE, learnable temperature) on
    (rendered image, random subset of its object sentences) pairs; AdamW with cosine decay.

    `scenes` the training scenes; returns the trained model in eval mode. steps=0 returns the
    random initialisation (seeded). Trains on `device`, returns the model on the CPU.
    """
    from transformers import CLIPModel

    from .toyworld import render

    torch.manual_seed(seed)
    model = CLIPModel(toy_clip_config(tokenizer))
    if steps == 0:
        return model.eval()
    generator = torch.Generator().manual_seed(seed)
    images = torch.stack([render(scene) for scene in scenes]).to(device)  # (N, 3, 32, 32)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.1)
    schedule = warmup_cosine(optimizer, steps)
    model.train()
    start = time.time()
    for step in range(1, steps + 1):
        index = torch.randint(0, len(scenes), (batch_size,), generator=generator)
        texts = [object_sentence_subset(scenes[i], generator) for i in index.tolist()]
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        output = model(input_ids=batch["input_ids"].to(device), pixel_values=clip_pixels(images[index.to(device)]), return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
            accuracy = (output.logits_per_text.argmax(1).cpu() == torch.arange(batch_size)).float().mean().item()
        _log_every(log, "clip", step, steps, start, loss=output.loss.item(), acc=accuracy)
    return model.cpu().eval()


# ------------------------------------------------------------------------------ toy VAE
def train_toy_vae(
    images: torch.Tensor,
    steps: int = 1500,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> Any:
    """Train the toy `AutoencoderKL` to reconstruct toy images (B, 3, 32, 32) in [0, 1].

    Loss: MSE in [-1, 1] of the decoded posterior sample + `kl_weight` x KL (small, so the
    posterior is nearly deterministic). Afterwards `config.scaling_factor` = 1 / std of the
    posterior means (SD's convention: scaled latents have unit variance). Returns it in eval mode.
    """
    torch.manual_seed(seed)
    vae = toy_vae().to(device)
    generator = torch.Generator().manual_seed(seed)
    pixels = (images * 2 - 1).to(device)
    if steps > 0:
        optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
        schedule = warmup_cosine(optimizer, steps)
        vae.train()
        start = time.time()
        for step in range(1, steps + 1):
            batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator).to(device)]
            posterior = vae.encode(batch).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
            reconstruction = vae.decode(latents).sample
            mse = F.mse_loss(reconstruction, batch)
            loss = mse + kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            _log_every(log, "vae", step, steps, start, mse=mse.item())
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, min(len(pixels), 1024), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std().clamp(min=1e-6)))
    return vae.cpu()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1] -> scaled posterior-mean latents (N, 4, 8, 8)."""
    device = next(vae.parameters()).device
    out = [vae.encode(images[i : i + batch_size].to(device) * 2 - 1).latent_dist.mean for i in range(0, len(images), batch_size)]
    return torch.cat(out) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Scaled latents (N, 4, 8, 8) -> images (N, 3, 32, 32) in [0, 1]."""
    device = next(vae.parameters()).device
    out = [vae.decode(latents[i : i + batch_size].to(device) / vae.config.scaling_factor).sample.cpu() for i in range(0, len(latents), batch_size)]
    return ((torch.cat(out).float() + 1) / 2).clamp(0, 1)


# ------------------------------------------------------------------------------ folders
def write_model_folders(root: Path, tokenizer, train_scenes: Sequence, config, log: Callable[[str], None] | None = print) -> dict[str, Path]:
    """Write `root/sd15` (SD1.5 pipeline layout), `root/t5`, `root/adapter`, `root/preference`.

    The toy CLIP (trained for `config.clip_steps`) gives the `text_encoder` (its text tower) and the
    preference model (the whole `CLIPModel` + tokenizer + a 32 px image processor); the VAE is
    trained for `config.vae_steps`; the UNet is a random `toy_unet` (train it with
    `train_base_unet`). The T5 folder is a small T5 encoder that reads the same word tokenizer.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPTextModel, T5Config, T5EncoderModel

    from .adapter import TextAdapter
    from .toyworld import render

    folders = {name: root / name for name in ("sd15", "t5", "adapter", "preference")}
    clip = train_toy_clip(train_scenes, tokenizer, steps=config.clip_steps, seed=config.seed, log=log, device=config.device)
    clip.save_pretrained(folders["preference"])
    tokenizer.save_pretrained(folders["preference"])
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
    ).save_pretrained(folders["preference"])

    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    images = torch.stack([render(scene) for scene in train_scenes[:2048]])
    vae = train_toy_vae(images, steps=config.vae_steps, seed=config.seed, log=log, device=config.device)
    torch.manual_seed(config.seed)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=toy_unet(),
        scheduler=PNDMScheduler.from_config(TOY_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folders["sd15"])

    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    t5.save_pretrained(folders["t5"])
    tokenizer.save_pretrained(folders["t5"])
    TextAdapter(in_dim=T5_WIDTH, int_dim=48, out_dim=TEXT_WIDTH).save_pretrained(folders["adapter"])
    return folders


# ------------------------------------------------------------------------------ text encoders
class PlainPromptEncoder(nn.Module):
    """Standard SD1.5 conditioning: the prompt cut to CLIP's 77-token window, last hidden state.

    `forward(prompts)` -> (B, 77, D): `<sot>` + the first 75 content tokens + `<eot>`, padded with
    the pad token to 77, as diffusers' `StableDiffusionPipeline.encode_prompt` does.
    """

    def __init__(self, tokenizer, text_encoder: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(batch["input_ids"].to(device)).last_hidden_state


def encode_in_batches(encode: Callable[[list[str]], torch.Tensor], prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Run a prompt encoder over many prompts in batches; returns the concatenated (N, L, D)."""
    return torch.cat([encode(list(prompts[i : i + batch_size])) for i in range(0, len(prompts), batch_size)])


# ------------------------------------------------------------------------------ base training
@dataclass
class BaseTrainingConfig:
    """The toy "SD1.5" pretraining: full UNet, standard 77-token conditioning, v-prediction MSE."""

    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    seed: int = 0


def train_base_unet(
    unet: nn.Module,
    latents: torch.Tensor,
    contexts: torch.Tensor,
    uncond: torch.Tensor,
    noise_scheduler,
    config: BaseTrainingConfig,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """Train every UNet weight from scratch (the toy's "SD1.5"; the stages only train LoRAs).

    Runs where `latents` are (move the UNet there first). `latents` (N, 4, 8, 8) scaled, `contexts` (N, 77, D) the frozen plain-CLIP encodings of the
    captions (computed once), `uncond` (1, 77, D) the empty prompt's, used with probability
    `caption_dropout` (for CFG). Timesteps uniform in [0, 1000); target v or eps per the
    scheduler's `prediction_type`; AdamW with warmup then cosine decay. Returns the UNet (eval).
    """
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    device = latents.device
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=1e-2)
    steps = config.steps
    schedule = warmup_cosine(optimizer, steps, config.warmup_steps, floor=0.1)
    unet.train()
    start = time.time()
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    for step in range(1, steps + 1):
        index = torch.randint(0, len(latents), (config.batch_size,), generator=generator).to(device)
        x0 = latents[index]
        context = contexts[index].clone()
        dropped = (torch.rand(config.batch_size, generator=generator) < config.caption_dropout).to(device)
        context[dropped] = uncond[0]
        noise = torch.randn(x0.shape, generator=generator).to(device)
        timesteps = torch.randint(0, num_train_timesteps, (config.batch_size,), generator=generator).to(device)
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(x0, noise, timesteps)
        else:
            target = noise
        prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        _log_every(log, "base unet", step, steps, start, loss=loss.item())
    return unet.eval()


# ------------------------------------------------------------------------------ sampling
@torch.no_grad()
def ddim_sample(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    context: torch.Tensor,
    uncond: torch.Tensor | None,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    latent_shape: tuple[int, int, int],
    steps: int = 25,
    guidance_scale: float = 3.0,
    generator: torch.Generator | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Deterministic DDIM (eta 0) with classifier-free guidance, from `longalign.diffusion` parts.

    `model(latents, timesteps, context) -> output` (the UNet's `.sample`); contexts (B, L, D) and
    `uncond` (B, L, D) or None (no guidance). Grid T-1, T-1-k, ..., k-1 (`ddim_timesteps`), last step
    to alphas_cumprod[0]. Returns the final x0 prediction (B, *latent_shape) float32.
    """
    batch = context.shape[0]
    latents = torch.randn((batch, *latent_shape), generator=generator).to(context.device)
    use_cfg = uncond is not None and guidance_scale != 1.0
    stride = num_train_timesteps // steps
    x0 = latents
    for t in ddim_timesteps(steps, num_train_timesteps):
        timesteps = torch.full((batch,), t, dtype=torch.long, device=context.device)
        if use_cfg:
            both = model(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), torch.cat([context, uncond]))
            x0_both, eps_both = predict_x0_and_eps(both, torch.cat([latents, latents]), t, alphas_cumprod, prediction_type)
            (x0_c, x0_u), (eps_c, eps_u) = x0_both.chunk(2), eps_both.chunk(2)
            x0, eps = guided(x0_u, x0_c, guidance_scale), guided(eps_u, eps_c, guidance_scale)
        else:
            output = model(latents, timesteps, context)
            x0, eps = predict_x0_and_eps(output, latents, t, alphas_cumprod, prediction_type)
        latents = ddim_step(x0, eps, t - stride, alphas_cumprod)
    return x0


@torch.no_grad()
def generate(
    unet: nn.Module,
    vae,
    noise_scheduler,
    contexts: torch.Tensor,
    uncond: torch.Tensor,
    steps: int = 25,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1] for contexts (N, L, D) with `ddim_sample`; image i uses the
    noise of generator seed `seed + i // batch_size` (fixed per batch, same for every model)."""
    unet.eval()
    latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

    def model(x, t, c):
        return unet(x, t, encoder_hidden_states=c).sample

    images = []
    for k, start in enumerate(range(0, len(contexts), batch_size)):
        device = next(unet.parameters()).device
        context = contexts[start : start + batch_size].to(device)
        negative = uncond.to(device).expand(len(context), -1, -1) if uncond is not None else None
        latents = ddim_sample(
            model, context, negative, noise_scheduler.alphas_cumprod, noise_scheduler.config.prediction_type,
            latent_shape, steps, guidance_scale, torch.Generator().manual_seed(seed + k),
            noise_scheduler.config.num_train_timesteps,
        )  # fmt: skip
        images.append(decode_latents(vae, latents))
    return torch.cat(images)
