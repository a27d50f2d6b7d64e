"""Model folders for the benchmark: tiny (from `longalign.tiny`) or full SD1.5 size with random weights.

`write_sd15_models(root)` builds every component the stages load at its real size, from configs,
with random weights and no download, and saves it in the hub's folder layout, so the production
loaders (`load_stage_parts`, `LongPromptPipeline.from_pretrained`, `load_preference_model`) and the
real stage code run on it unchanged. The cost of a step depends only on the shapes, so the numbers
are the real models' cost on any machine:

- `sd15/`: SD1.5 UNet (block_out_channels 320/640/1280/1280, layers_per_block 2, attention_head_dim 8,
  cross_attention_dim 768), VAE (128/256/512/512, scaling 0.18215), CLIP ViT-L/14 text model (hidden
  768, 12 layers, 12 heads, intermediate 3072, 77 positions, vocabulary 49408) with the real CLIP BPE
  tokenizer, SD1.5's scheduler;
- `t5/`: the T5-large encoder (d_model 1024, d_kv 64, d_ff 4096, 24 layers, 16 heads, ReLU,
  vocabulary 32128) with a small sentencepiece tokenizer (T5 always sees 240 tokens, so its cost does
  not depend on the tokenizer);
- `adapter/`: `TextAdapter(1024, 896, 768)`;
- `preference/`: a ViT-H/14 CLIP preference model (transformers `CLIPModel`: vision hidden 1280, 32
  layers, 16 heads, patch 14, 224 px, intermediate 5120; text hidden 1024, 24 layers, 16 heads,
  intermediate 4096; projection 1024), as Denscore / PickScore / CLIP-H.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from longalign.adapter import TextAdapter
from longalign.tiny import MARKER as TINY_MARKER
from longalign.tiny import (
    SD15_SCHEDULER,
    check_random_weights_root,
    clip_text_config,
    write_clip_tokenizer,
    write_t5_tokenizer,
    write_tiny_models,
)

MARKER = "bench_models.json"
SIZES = ("tiny", "sd15")


def sd15_unet():
    """SD1.5's UNet2DConditionModel config (diffusers' defaults are SD1.5's, except the text width)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=32,
    )


def sd15_vae():
    """SD1.5's AutoencoderKL (four levels, 128/256/512/512 channels, latent scaling 0.18215)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )


def clip_l_text_config():
    """CLIP ViT-L/14 text model (SD1.5's text encoder)."""
    return clip_text_config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)


def t5_large_config():
    """T5-large (google-t5/t5-large) encoder config."""
    from transformers import T5Config

    return T5Config(
        vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16,
        feed_forward_proj="relu", relative_attention_num_buckets=32, layer_norm_epsilon=1e-6,
    )  # fmt: skip


def vit_h14_clip_config():
    """CLIP ViT-H/14 (LAION; the architecture of Denscore, PickScore and CLIP-H)."""
    from transformers import CLIPConfig, CLIPVisionConfig

    text = clip_text_config(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        projection_dim=1024, hidden_act="gelu",
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
        image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu",
    )  # fmt: skip
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=1024)


def _build(factory, device: str, dtype: torch.dtype):
    """Construct a model with random weights on `device` (fast init on a GPU) in `dtype`."""
    with torch.device(device):
        model = factory()
    return model.to(dtype)


def write_sd15_models(root: str | Path, device: str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, Path]:
    """Write full-size random-weight SD1.5, T5-large, adapter and ViT-H/14 folders under `root`.

    Weights are stored in `dtype` (bf16 by default: half the disk and load time; the stages cast
    them to their own precision when loading). Returns {name: folder}.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTextModel,
        CLIPTokenizer,
        T5EncoderModel,
    )

    root = Path(root)
    folders = {name: root / name for name in ("sd15", "t5", "adapter", "preference")}
    torch.manual_seed(seed)
    tokenizer_folder = folders["sd15"] / "tokenizer"
    write_clip_tokenizer(tokenizer_folder)
    pipeline = StableDiffusionPipeline(
        vae=_build(sd15_vae, device, dtype),
        text_encoder=_build(lambda: CLIPTextModel(clip_l_text_config()), device, dtype),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_folder),
        unet=_build(sd15_unet, device, dtype),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folders["sd15"])
    del pipeline

    write_t5_tokenizer(folders["t5"])
    _build(lambda: T5EncoderModel(t5_large_config()), device, dtype).save_pretrained(folders["t5"])
    _build(lambda: TextAdapter(in_dim=1024, int_dim=896, out_dim=768), device, dtype).save_pretrained(folders["adapter"])

    _build(lambda: CLIPModel(vit_h14_clip_config()), device, dtype).save_pretrained(folders["preference"])
    AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(folders["preference"])
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folders["preference"])
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return folders


def models_ready(size: str, root: str | Path) -> bool:
    """True when a previous run wrote the models of `size` under `root` (read, not written again);
    False for a damaged marker (the models are written again)."""
    try:
        return json.loads((Path(root) / MARKER).read_text()).get("size") == size
    except (OSError, ValueError, AttributeError):
        return False


def ensure_models(size: str, root: str | Path, device: str = "cpu") -> dict[str, Path]:
    """The model folders of `size` under `root`, written unless a previous run left them there."""
    if size not in SIZES:
        raise ValueError(f"unknown size '{size}'; choose one of: {', '.join(SIZES)}")
    root = Path(root)
    names = ("sd15", "t5", "adapter", "preference")
    if models_ready(size, root):
        return {name: root / name for name in names}
    check_random_weights_root(root, names, (MARKER, TINY_MARKER))  # never over a real model download
    root.mkdir(parents=True, exist_ok=True)
    folders = write_tiny_models(root, markers=(MARKER, TINY_MARKER)) if size == "tiny" else write_sd15_models(root, device=device)
    (root / MARKER).write_text(json.dumps({"size": size}))
    return folders
