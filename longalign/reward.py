"""Preference models and the decomposed preference optimisation (paper §4; METHOD.md §4).

A CLIP-like preference model scores an image x against a prompt t by the cosine x . t of their
L2-normalised embeddings. Long prompts are scored at segment level: each segment is embedded and
normalised, and the per-prompt mean (not re-normalised) is the prompt's text embedding (§4.1).
The text embeddings of a batch share a large common direction V (paper Fig. 2b: eta = t . V is
about 0.8-0.9 for every CLIP-based model), so t splits into a text-relevant part
`t_perp = t - eta V` and a text-irrelevant part `eta V`. The reward fine-tuning loss down-weights
the text-irrelevant part by `w` (§4.2): `t' = t - (1 - w) eta V`, `s = x . t'`,
`loss = 0.5 (1 - mean s)`.

Parts:
- `PREFERENCE_MODELS` (name -> `PreferenceModelSpec`) and `load_preference_model`;
- `PreferenceModel` with two backends, `CLIPPreferenceModel` (transformers `CLIPModel`) and
  `OpenCLIPPreferenceModel` (open_clip), both frozen: `embed_images` (differentiable) and
  `embed_texts` / `encode_texts`;
- pure functions: `average_segments`, `common_direction`, `decompose`, `reweighted_score`,
  `preference_loss`, `auto_text_irrelevant_weight`, `check_text_irrelevant_weight`;
- `CommonDirection`, the provider of V (`batch` / `ema` / `file`), and
  `compute_common_direction` / `save_common_direction` for the `file` mode;
- `DecomposedReward`, the reward stages' scorer (`reward_loss` in train_reward.py calls it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .loading import UserError, error_line, fetch_file, load_pretrained, resolve_source
from .text_encoding import check_tokenizer, get_segmenter

logger = logging.getLogger(__name__)

CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# CLIP's image normalisation (OpenAI), used when a model ships no preprocessor config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Released: RandomCrop(504) of a 512-px image (against blocky VAE artefacts), then resize.
CROP_FRACTION = 504 / 512
TEXT_MODES = ("segment", "single")
DIRECTION_MODES = ("batch", "ema", "file")
DIRECTION_KEY = "common_direction"
# Released loss offset: the code subtracts 0.09 (1 - w) from the loss (no effect on gradients).
RELEASED_LOSS_OFFSET = 0.09


# ------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class PreferenceModelSpec:
    """How to load one preference model (METHOD.md §4).

    `backend` is `transformers` (a `CLIPModel` folder/hub id in `source`, tokenizer and image
    processor config from `tokenizer_source`, default `source`) or `open_clip` (`source` is an
    open_clip model name, `checkpoint` an optional (hub repo or folder, file name) pair or a
    file path / open_clip pretrained tag).
    """

    backend: str
    source: str
    tokenizer_source: str | None = None
    checkpoint: tuple[str, str] | str | None = None
    description: str = ""


PREFERENCE_MODELS: dict[str, PreferenceModelSpec] = {
    "denscore": PreferenceModelSpec(
        "transformers", "luping-liu/Denscore", CLIP_H, description="Denscore (segment-level preference, the paper's default)"
    ),
    "pickscore": PreferenceModelSpec("transformers", "yuvalkirstain/PickScore_v1", CLIP_H, description="PickScore v1"),
    "clip_h": PreferenceModelSpec("transformers", CLIP_H, description="CLIP ViT-H/14 (LAION-2B)"),
    "hpsv2": PreferenceModelSpec(
        "open_clip", "ViT-H-14", checkpoint=("xswu/HPSv2", "HPS_v2_compressed.pt"), description="HPS v2 (open_clip ViT-H-14)"
    ),
}
OPEN_CLIP_PREFIX = "open_clip:"
_OPEN_CLIP_SCHEMAS = ("local-dir:", "hf-hub:")


def _choices() -> str:
    return ", ".join(PREFERENCE_MODELS) + ", open_clip:MODEL_NAME[:CHECKPOINT], or a local model folder"


def resolve_preference_spec(name_or_path: str) -> PreferenceModelSpec:
    """Map a registry name, `open_clip:MODEL[:CHECKPOINT]`, a registered hub id or a local folder to a spec.

    A local folder works like the hub id it replaces: a transformers `CLIPModel` folder
    (`config.json`) uses its own tokenizer/processor files when it has them, else the CLIP-H
    tokenizer that Denscore and PickScore use; a folder with `open_clip_config.json` is loaded by
    open_clip. Anything else raises a `UserError` naming the choices.
    """
    name = str(name_or_path)
    if name in PREFERENCE_MODELS:
        return PREFERENCE_MODELS[name]
    if name.startswith(OPEN_CLIP_PREFIX):
        rest = name[len(OPEN_CLIP_PREFIX) :]
        if rest.startswith(_OPEN_CLIP_SCHEMAS):
            return PreferenceModelSpec("open_clip", rest)
        model, _, checkpoint = rest.partition(":")
        if not model:
            raise UserError(f"'{name}' names no open_clip model; use open_clip:MODEL_NAME[:CHECKPOINT]")
        return PreferenceModelSpec("open_clip", model, checkpoint=checkpoint or None)
    for spec in PREFERENCE_MODELS.values():
        if spec.backend == "transformers" and name == spec.source:
            return spec
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "open_clip_config.json")):
            return PreferenceModelSpec("open_clip", f"local-dir:{path}")
        if os.path.exists(os.path.join(path, "config.json")):
            has_tokenizer = any(
                os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
            )
            return PreferenceModelSpec("transformers", path, path if has_tokenizer else CLIP_H)
        raise UserError(f"preference model folder '{path}' has neither config.json (transformers) nor open_clip_config.json")
    raise UserError(f"unknown preference model '{name}'; choose one of: {_choices()}")


# ------------------------------------------------------------------------- pure functions
def average_segments(segment_embeds: torch.Tensor, segment_counts: Sequence[int]) -> torch.Tensor:
    """Segment-level text embedding (paper §4.1): mean of each prompt's segment embeddings.

    `segment_embeds` (S, E) are the L2-normalised embeddings of all segments of a batch in order,
    `segment_counts` the number of segments per prompt (sum = S, each >= 1). Returns (B, E); the
    mean is deliberately NOT re-normalised (its norm shrinks when the segments disagree).
    """
    counts = torch.as_tensor(list(segment_counts), device=segment_embeds.device)
    if counts.numel() == 0 or int(counts.min()) < 1 or int(counts.sum()) != segment_embeds.shape[0]:
        raise ValueError(f"segment counts {list(segment_counts)} do not cover {segment_embeds.shape[0]} segments")
    owner = torch.repeat_interleave(torch.arange(len(counts), device=segment_embeds.device), counts)  # (S,)
    sums = torch.zeros(len(counts), segment_embeds.shape[1], dtype=segment_embeds.dtype, device=segment_embeds.device)
    sums = sums.index_add(0, owner, segment_embeds)  # (B, E)
    return sums / counts.to(segment_embeds.dtype)[:, None]


def common_direction(text_embeds: torch.Tensor) -> torch.Tensor:
    """The common direction V of a set of text embeddings (paper §4.2, Fig. 2): normalise(mean).

    `text_embeds` (N, E) -> V (E,) with |V| = 1. In training the set is the batch gathered across
    all processes (`CommonDirection`).
    """
    embeds = text_embeds.to(torch.promote_types(text_embeds.dtype, torch.float32))  # bf16/fp16 -> fp32
    return F.normalize(embeds.mean(dim=0), dim=0)


@dataclass
class Decomposition:
    """`t = t_perp + eta V` (paper §4.2): eta (B,), text-relevant t_perp (B, E), text-irrelevant eta V (B, E)."""

    eta: torch.Tensor
    text_relevant: torch.Tensor
    text_irrelevant: torch.Tensor


def decompose(text_embeds: torch.Tensor, direction: torch.Tensor) -> Decomposition:
    """Split text embeddings along the common direction (paper §4.2, Fig. 2).

    `text_embeds` (B, E), `direction` V (E,) unit norm. `eta = t . V` (B,), text-irrelevant part
    `eta V` (B, E), text-relevant part `t_perp = t - eta V` (B, E), orthogonal to V.
    """
    direction = direction.to(text_embeds.dtype)
    eta = text_embeds @ direction  # (B,)
    irrelevant = eta[:, None] * direction[None, :]
    return Decomposition(eta, text_embeds - irrelevant, irrelevant)


def check_text_irrelevant_weight(weight: float | str) -> float | str:
    """Validate the text-irrelevant weight w (paper §4.2): a number in [0, 1] or `"auto"`.

    Strings holding numbers are accepted (`"0.3"`). Anything else raises a `UserError`; the
    released code crashed on an empty value.
    """
    if isinstance(weight, str):
        if weight.strip().lower() == "auto":
            return "auto"
        try:
            weight = float(weight)
        except ValueError:
            raise UserError(f"text_irrelevant_weight must be a number in [0, 1] or 'auto', got '{weight}'") from None
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= float(weight) <= 1.0:
        raise UserError(f"text_irrelevant_weight must be a number in [0, 1] or 'auto', got {weight!r}")
    return float(weight)


def auto_text_irrelevant_weight(eta_mean: float) -> float:
    """`w = auto` (METHOD.md §4): `w = 0.4 sqrt(1 - eta^2) / eta`, clipped to [0, 1].

    Keeps the text-irrelevant / text-relevant gradient ratio `w eta / sqrt(1 - eta^2)` at 0.4,
    the paper's balance at eta = 0.8 with w = 0.3 (§4.2). eta <= 0 (no common part) gives 1.
    """
    eta = float(eta_mean)
    if eta <= 0.0:
        return 1.0
    if eta >= 1.0:
        return 0.0
    return min(1.0, 0.4 * math.sqrt(1.0 - eta * eta) / eta)


def reweighted_score(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, direction: torch.Tensor, weight: float
) -> torch.Tensor:
    """The reweighted preference score (paper §4.2, Eq. for t'): `s = x . (t - (1 - w) eta V)`.

    `image_embeds` x (B, E) and `text_embeds` t (B, E) as the preference model returns them,
    `direction` V (E,), `weight` w in [0, 1] (w = 1: plain score x . t; w = 0: only the
    text-relevant part x . t_perp). Returns s (B,).
    """
    parts = decompose(text_embeds, direction)
    reweighted = text_embeds - (1.0 - float(weight)) * parts.text_irrelevant  # t' (B, E)
    return (image_embeds * reweighted).sum(dim=-1)


def preference_loss(scores: torch.Tensor, weight: float, released_offset: bool = False) -> torch.Tensor:
    """Reward loss (paper §4.2): `0.5 (1 - mean s)`; optionally minus the released `0.09 (1 - w)`.

    `scores` s (B,). The offset is a constant: it changes the logged value only, not gradients.
    """
    loss = 0.5 * (1.0 - scores.mean())
    if released_offset:
        loss = loss - RELEASED_LOSS_OFFSET * (1.0 - float(weight))
    return loss


# -------------------------------------------------------------------------- image side
def crop_and_resize(
    images: torch.Tensor, size: int, generator: torch.Generator | None = None, random_crop: bool = True
) -> torch.Tensor:
    """Differentiable image preparation (METHOD.md §4): random crop, then resize to the model input.

    `images` (B, 3, H, W). With `random_crop`, the batch is cropped to 504/512 of each side (504 px
    of a 512 px image, against blocky artefacts; scaled to other resolutions) at one offset for the
    whole batch, drawn from `generator` (or the global torch RNG), as the released `RandomCrop` on
    the batch tensor does. The result is resized so its shorter side is `size`
    (bilinear, antialiased: the released `transforms.Resize((224, 224))` on tensors) and
    centre-cropped to (B, 3, size, size). No-op steps are skipped.
    """
    _, _, height, width = images.shape
    if random_crop:
        crop_h = max(1, round(height * CROP_FRACTION))
        crop_w = max(1, round(width * CROP_FRACTION))
        device = generator.device if generator is not None else "cpu"
        top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator, device=device))
        left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator, device=device))
        images = images[:, :, top : top + crop_h, left : left + crop_w]
        height, width = crop_h, crop_w
    if min(height, width) != size:
        scale = size / min(height, width)
        new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
        images = F.interpolate(images, size=new_size, mode="bilinear", antialias=True, align_corners=False)
        height, width = new_size
    if (height, width) != (size, size):
        top, left = (height - size) // 2, (width - size) // 2
        images = images[:, :, top : top + size, left : left + size]
    return images


# -------------------------------------------------------------------------- text side
@dataclass
class TextEmbeddings:
    """Text embeddings of a batch of prompts (paper §4.1).

    `prompt_embeds` (B, E): per prompt, the mean of its normalised segment embeddings (`segment`
    mode) or the normalised embedding of the prompt cut to 77 tokens (`single` mode).
    `segment_embeds` (S, E) normalised, `segment_counts` and `segments` per prompt (in `single`
    mode every prompt is one segment, the prompt itself).
    """

    prompt_embeds: torch.Tensor
    segment_embeds: torch.Tensor
    segment_counts: list[int]
    segments: list[list[str]]


class _OpenCLIPSegmentTokenizer:
    """An open_clip tokenizer behind the slice of the transformers tokenizer interface that
    segmenters may use (`text_encoding.Segmenter`): content-token ids, `decode`, the window, `len`."""

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer = tokenizer
        self.model_max_length = context_length

    def __len__(self) -> int:
        inner = getattr(self.tokenizer, "tokenizer", None)
        if inner is not None and hasattr(inner, "__len__"):
            return len(inner)
        return int(getattr(self.tokenizer, "vocab_size", 0))

    def _encode(self, text: str) -> list[int]:
        if hasattr(self.tokenizer, "encode"):
            return list(self.tokenizer.encode(text))
        return list(self.tokenizer.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        if hasattr(self.tokenizer, "decode"):  # open_clip's SimpleTokenizer
            return self.tokenizer.decode(list(ids))
        return self.tokenizer.tokenizer.decode(list(ids))  # open_clip's HFTokenizer wraps a transformers one

    def __call__(self, text, add_special_tokens: bool = True, **_: Any) -> dict[str, list]:
        if add_special_tokens:
            raise NotImplementedError("only content-token counts are needed by the segmenters")
        if isinstance(text, str):
            return {"input_ids": self._encode(text)}
        return {"input_ids": [self._encode(piece) for piece in text]}


# ------------------------------------------------------------------------ the scorer
class PreferenceModel(nn.Module):
    """A frozen CLIP-like preference model (paper §4; METHOD.md §4).

    `embed_images(images)` maps images (B, 3, H, W) in [0, 1] to L2-normalised embeddings (B, E),
    differentiably (random crop, resize, CLIP mean/std). `embed_texts(prompts, mode)` maps prompts to
    (B, E): `segment` mode averages the normalised embeddings of the prompt's segments (project
    segmenter), `single` mode embeds the prompt cut to the context window. Text runs under no_grad.
    All weights have `requires_grad=False` and the model stays in eval mode.
    Backends implement `_image_features`, `_text_features` and `tokenize`.
    """

    def __init__(
        self,
        image_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        segment_tokenizer: Any,
        segmenter: str = "sentences",
        text_batch_size: int = 256,
        name: str = "",
    ):
        super().__init__()
        self.image_size = int(image_size)
        mean = torch.tensor(list(image_mean), dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(list(image_std), dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("image_mean", mean, persistent=False)
        self.register_buffer("image_std", std, persistent=False)
        self.segment_tokenizer = segment_tokenizer
        self.segmenter = get_segmenter(segmenter)
        self.text_batch_size = text_batch_size
        self.name = name

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "PreferenceModel":
        """The scorer is always in eval mode; `train()` is ignored so a caller cannot flip it."""
        return super().train(False)

    # backend hooks ------------------------------------------------------------------
    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, E)
        raise NotImplementedError

    def _text_features(self, input_ids: torch.Tensor) -> torch.Tensor:  # (N, 77) -> (N, E)
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:  # -> (N, context) token ids
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.image_mean.device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    # images ----------------------------------------------------------------------------
    def prepare_images(
        self, images: torch.Tensor, generator: torch.Generator | None = None, random_crop: bool = True
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> (B, 3, S, S) in [0, 1] at the model's input size S."""
        return crop_and_resize(images, self.image_size, generator, random_crop)

    def embed_images(
        self, images: torch.Tensor, generator: torch.Generator | None = None, random_crop: bool = True
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> L2-normalised embeddings (B, E), differentiable.

        Preprocessing (`crop_and_resize`): a random crop of 504/512 of each side drawn from
        `generator` (skip with `random_crop=False`), bilinear antialiased resize to the input size,
        centre crop, CLIP mean/std. Gradients flow to `images`, never into the scorer's weights.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        pixels = self.prepare_images(images, generator, random_crop)
        pixels = (pixels.to(self.image_mean.dtype) - self.image_mean) / self.image_std
        features = self._image_features(pixels.to(self.device, self.dtype))
        return F.normalize(features.float(), dim=-1)

    # texts -----------------------------------------------------------------------------
    def split(self, prompt: str) -> list[str]:
        """The prompt's segments under the project segmenter (same as the text encoder's)."""
        return self.segmenter(prompt, tokenizer=self.segment_tokenizer)

    @torch.no_grad()
    def _embed_strings(self, texts: Sequence[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), self.text_batch_size):
            input_ids = self.tokenize(list(texts[start : start + self.text_batch_size])).to(self.device)
            chunks.append(F.normalize(self._text_features(input_ids).float(), dim=-1))
        return torch.cat(chunks, dim=0)  # (N, E)

    def encode_texts(self, prompts: Sequence[str], mode: str = "segment") -> TextEmbeddings:
        """Prompts -> `TextEmbeddings` (prompt embeddings (B, E) plus the per-segment parts), §4.1."""
        if mode not in TEXT_MODES:
            raise UserError(f"unknown text mode '{mode}'; choose one of: {', '.join(TEXT_MODES)}")
        prompts = [str(prompt) for prompt in prompts]
        segments = [self.split(prompt) for prompt in prompts] if mode == "segment" else [[p] for p in prompts]
        flat = [segment for pieces in segments for segment in pieces]
        segment_embeds = self._embed_strings(flat)  # (S, E)
        counts = [len(pieces) for pieces in segments]
        return TextEmbeddings(average_segments(segment_embeds, counts), segment_embeds, counts, segments)

    def embed_texts(self, prompts: Sequence[str], mode: str = "segment") -> torch.Tensor:
        """Prompts -> text embeddings (B, E) (paper §4.1); see `encode_texts` for the parts."""
        return self.encode_texts(prompts, mode).prompt_embeds


class CLIPPreferenceModel(PreferenceModel):
    """Backend for a transformers `CLIPModel` (Denscore, PickScore, CLIP-H).

    Features are `visual_projection(vision_model(...).pooler_output)` and
    `text_projection(text_model(...).pooler_output)`; texts are tokenized to the 77-token window.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, image_mean=CLIP_MEAN, image_std=CLIP_STD, **kwargs: Any):
        super().__init__(model.config.vision_config.image_size, image_mean, image_std, tokenizer, **kwargs)
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))
        self._freeze()

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixel_values).pooler_output)

    def _text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.text_projection(self.model.text_model(input_ids=input_ids).pooler_output)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(
            list(texts), padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        )
        return batch["input_ids"]


class OpenCLIPPreferenceModel(PreferenceModel):
    """Backend for an open_clip model (HPSv2, any `open_clip:MODEL[:CHECKPOINT]`).

    Takes an already-built open_clip model (e.g. from `open_clip.create_model`) and its tokenizer
    (`open_clip.get_tokenizer`); features come from `encode_image` / `encode_text`, image size and
    mean/std from the model's preprocess config.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, **kwargs: Any):
        import open_clip

        preprocess = open_clip.get_model_preprocess_cfg(model)
        size = preprocess.get("size", getattr(model.visual, "image_size", 224))
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = preprocess.get("mean", CLIP_MEAN)
        std = preprocess.get("std", CLIP_STD)
        context_length = int(getattr(tokenizer, "context_length", None) or getattr(model, "context_length", 77))
        super().__init__(size, mean, std, _OpenCLIPSegmentTokenizer(tokenizer, context_length), **kwargs)
        self.context_length = context_length
        self.model = model
        self.tokenizer = tokenizer
        self._freeze()

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def _text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts), context_length=self.context_length)


def _image_normalisation(source: str) -> tuple[Sequence[float], Sequence[float]]:
    """CLIP mean/std from `preprocessor_config.json` of `source`; CLIP defaults if a folder has none."""
    if os.path.isdir(source) and not os.path.exists(os.path.join(source, "preprocessor_config.json")):
        logger.info("no preprocessor_config.json in '%s'; using CLIP's mean/std", source)
        return CLIP_MEAN, CLIP_STD
    with open(fetch_file(source, "preprocessor_config.json", "preference model image processor config")) as handle:
        config = json.load(handle)
    return config.get("image_mean", CLIP_MEAN), config.get("image_std", CLIP_STD)


def load_preference_model(
    name_or_path: str = "denscore",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    segmenter: str = "sentences",
) -> PreferenceModel:
    """Load a frozen preference model by registry name, `open_clip:MODEL[:CHECKPOINT]` or folder (§4).

    Registry: `PREFERENCE_MODELS` (denscore, pickscore, clip_h, hpsv2). Hub ids need hub access;
    a local download of the same repo can be passed as a folder instead. Unknown names and
    missing files raise a one-line `UserError`.
    """
    spec = resolve_preference_spec(name_or_path)
    name = str(name_or_path)
    if spec.backend == "transformers":
        from transformers import AutoTokenizer, CLIPModel

        tokenizer_source = spec.tokenizer_source or spec.source
        tokenizer = load_pretrained(AutoTokenizer, tokenizer_source, "preference model tokenizer")
        check_tokenizer(tokenizer, tokenizer_source)
        mean, std = _image_normalisation(resolve_source(tokenizer_source, "preference model image processor"))
        model = load_pretrained(CLIPModel, spec.source, "preference model", dtype=dtype)
        scorer: PreferenceModel = CLIPPreferenceModel(model, tokenizer, mean, std, segmenter=segmenter, name=name)
    elif spec.backend == "open_clip":
        import open_clip

        checkpoint = spec.checkpoint
        if isinstance(checkpoint, tuple):
            try:
                checkpoint = fetch_file(checkpoint[0], checkpoint[1], f"{name} checkpoint")
            except UserError as error:
                raise UserError(
                    f"{error}; or pass open_clip:{spec.source}:/path/to/{spec.checkpoint[1]}"
                ) from None
        elif checkpoint and (os.sep in checkpoint or checkpoint.endswith((".pt", ".bin", ".safetensors", ".pth"))):
            checkpoint = resolve_source(checkpoint, f"{name} checkpoint")
        if not spec.source.startswith(_OPEN_CLIP_SCHEMAS) and spec.source.replace("/", "-") not in open_clip.list_models():
            raise UserError(f"'{spec.source}' is not an open_clip model name (see open_clip.list_models())")
        try:
            model = open_clip.create_model(spec.source, pretrained=checkpoint, device="cpu", weights_only=True)
            tokenizer = open_clip.get_tokenizer(spec.source)
        except (RuntimeError, ValueError, FileNotFoundError, OSError, KeyError) as error:
            reason = error_line(error, 200)
            raise UserError(f"could not load open_clip preference model '{name}' ({reason})") from None
        scorer = OpenCLIPPreferenceModel(model, tokenizer, segmenter=segmenter, name=name)
    else:  # pragma: no cover - specs are written in this module
        raise UserError(f"unknown preference model backend '{spec.backend}'")
    scorer.model.to(dtype=dtype)  # mean/std buffers stay float32
    return scorer.to(device)


# ------------------------------------------------------------------- common direction V
def save_common_direction(path: str | os.PathLike, direction: torch.Tensor, metadata: dict[str, str] | None = None) -> None:
    """Write V (E,) as safetensors under the key `common_direction` (for `CommonDirection(mode="file")`)."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {DIRECTION_KEY: F.normalize(direction.detach().float().cpu().reshape(-1), dim=0).contiguous()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_common_direction(path: str | os.PathLike, model: str | None = None, mode: str | None = None) -> torch.Tensor:
    """Read V (E,) written by `save_common_direction`; a missing or foreign file is a `UserError`.

    V must be a unit vector (`decompose` assumes it). With `mode`, a file made in another text
    mode is refused (`compute_common_direction` records it); with `model`, one made with another
    preference model name gets a warning (the same model may go by a registry name or a folder).
    """
    from safetensors import SafetensorError, safe_open

    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"common direction file not found: '{path}' (make one with compute_common_direction)")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            direction = handle.get_tensor(DIRECTION_KEY) if DIRECTION_KEY in handle.keys() else None
    except (SafetensorError, OSError) as error:
        raise UserError(f"could not read common direction file '{path}' ({error})") from None
    if direction is None or direction.ndim != 1:
        raise UserError(f"'{path}' holds no 1-D '{DIRECTION_KEY}' tensor")
    norm = float(direction.float().norm())
    if abs(norm - 1.0) > 1e-3:
        raise UserError(f"'{path}': V has norm {norm:.4g}, not 1; write it with save_common_direction")
    if mode is not None and metadata.get("mode", mode) != mode:
        raise UserError(f"'{path}' was computed in text mode '{metadata['mode']}', this run uses '{mode}'")
    if model is not None and metadata.get("model", model) != model:
        logger.warning("'%s' was computed with preference model '%s'; this run uses '%s'", path, metadata["model"], model)
    return direction


@torch.no_grad()
def compute_common_direction(
    preference_model: PreferenceModel,
    prompts: Sequence[str],
    mode: str = "segment",
    batch_size: int = 64,
    path: str | os.PathLike | None = None,
) -> torch.Tensor:
    """V of a whole prompt set (paper §4.2): normalise(mean of its text embeddings) -> (E,).

    Embeds the prompts in batches (`mode` as in `embed_texts`); with `path`, also saves V as
    safetensors (metadata: model, mode, prompt count) for `CommonDirection(mode="file")`.
    """
    prompts = list(prompts)
    if not prompts:
        raise UserError("compute_common_direction needs at least one prompt")
    total = None
    for start in range(0, len(prompts), batch_size):
        embeds = preference_model.embed_texts(prompts[start : start + batch_size], mode).float()
        total = embeds.sum(dim=0) if total is None else total + embeds.sum(dim=0)
    direction = F.normalize(total, dim=0)
    if path is not None:
        meta = {"model": preference_model.name, "mode": mode, "prompts": str(len(prompts))}
        save_common_direction(path, direction, meta)
    return direction


class CommonDirection:
    """Provider of the common direction V for the decomposition (paper §4.2).

    Modes:
    - `batch` (released): V = normalise(mean of this step's text embeddings gathered over all
      processes with `accelerator.gather`); identical on every rank.
    - `ema`: an exponential moving average (decay `ema_decay`) of the gathered batch means
      across steps, normalised; `state_dict()` / `load_state_dict()` make it checkpointable
      (the training loop keeps it in `training_state.json` through `Stage.stateful`).
    - `file`: a fixed V read from safetensors (`compute_common_direction(..., path=...)`).
    A global batch of one prompt in `batch` mode warns once: V is then that prompt's own direction
    and the text-relevant part is zero.
    """

    def __init__(self, mode: str = "batch", accelerator: Any = None, ema_decay: float = 0.99, path: str | None = None):
        self.check_settings(mode, ema_decay, path)
        self.mode = mode
        self.accelerator = accelerator
        self.ema_decay = float(ema_decay)
        self.ema: torch.Tensor | None = None
        self.steps = 0
        self._warned_single = False
        self.fixed = load_common_direction(path) if mode == "file" else None

    @staticmethod
    def check_settings(mode: str, ema_decay: float, path: str | None) -> None:
        """A `UserError` for an unknown mode, an EMA decay outside [0, 1), or file mode without a path."""
        if mode not in DIRECTION_MODES:
            raise UserError(f"unknown common direction mode '{mode}'; choose one of: {', '.join(DIRECTION_MODES)}")
        if not 0.0 <= ema_decay < 1.0:
            raise UserError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if mode == "file" and path is None:
            raise UserError("common direction mode 'file' needs a path (--common_direction_file)")

    def gathered_mean(self, values: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean of `values` (B, E) over this step's batch on every process -> ((E,), global B), no grad."""
        embeds = values.detach().float()
        total = embeds.sum(dim=0, keepdim=True)  # (1, E)
        count = torch.tensor([embeds.shape[0]], device=embeds.device, dtype=torch.float32)
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            total = self.accelerator.gather(total)  # (P, E)
            count = self.accelerator.gather(count)  # (P,)
        n = int(count.sum().item())
        return total.sum(dim=0) / max(n, 1), n

    def __call__(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """V (E,) for this step's text embeddings (B, E) (no gradient)."""
        if self.mode == "file":
            if self.fixed.shape[0] != text_embeds.shape[-1]:
                raise UserError(
                    f"common direction file has width {self.fixed.shape[0]}, the preference model {text_embeds.shape[-1]}"
                )
            return self.fixed.to(text_embeds.device)
        mean, count = self.gathered_mean(text_embeds)
        if self.mode == "batch":
            if count == 1 and not self._warned_single:
                self._warned_single = True
                warnings.warn(
                    "common direction from a global batch of one prompt is that prompt's own direction, so the "
                    "decomposition is degenerate (text-relevant part = 0); use common direction mode 'ema' or 'file'",
                    UserWarning,
                    stacklevel=2,
                )
            return F.normalize(mean, dim=0)
        if self.ema is None:
            self.ema = mean
        else:
            self.ema = self.ema_decay * self.ema.to(mean.device) + (1.0 - self.ema_decay) * mean
        self.steps += 1
        return F.normalize(self.ema, dim=0)

    def state_dict(self) -> dict[str, Any]:
        """The EMA state (`ema` (E,) or None, `steps`) for checkpoints."""
        return {"ema": None if self.ema is None else self.ema.detach().cpu(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.ema = None if state.get("ema") is None else torch.as_tensor(state["ema"]).float()
        self.steps = int(state.get("steps", 0))


# --------------------------------------------------------------------------- entry point
@dataclass
class RewardConfig:
    """Options of the decomposed preference reward (paper §4; METHOD.md §4, §5 reward stages)."""

    reward_model: str = field(default="denscore", metadata={"help": "preference model: registry name, open_clip:MODEL[:CKPT] or a folder"})
    text_irrelevant_weight: str = field(
        default="0.3", metadata={"help": "w in [0, 1] or 'auto' (REWEIGHT in the released launcher)"}
    )
    text_mode: str = field(default="segment", metadata={"help": "segment (average over segments) or single (first 77 tokens)"})
    common_direction: str = field(default="batch", metadata={"help": "batch (released), ema, or file"})
    common_direction_ema_decay: float = field(default=0.99, metadata={"help": "decay of the ema mode"})
    common_direction_file: str | None = field(default=None, metadata={"help": "safetensors V for the file mode"})
    released_loss_offset: bool = field(default=False, metadata={"help": "subtract the released constant 0.09 (1 - w)"})
    random_crop: bool = field(default=True, metadata={"help": "random 504/512 crop before the scorer (released)"})

    def __post_init__(self) -> None:
        """Check the options before any model loads (a typo must not cost loading SD1.5 and T5 first)."""
        check_text_irrelevant_weight(self.text_irrelevant_weight)
        if self.text_mode not in TEXT_MODES:
            raise UserError(f"unknown text mode '{self.text_mode}'; choose one of: {', '.join(TEXT_MODES)}")
        CommonDirection.check_settings(self.common_direction, self.common_direction_ema_decay, self.common_direction_file)
        if self.common_direction == "file":
            load_common_direction(self.common_direction_file, self.reward_model, self.text_mode)


def decomposed_reward(
    preference_model: PreferenceModel,
    images: torch.Tensor,
    prompts: Sequence[str],
    direction: CommonDirection,
    text_irrelevant_weight: float | str = 0.3,
    text_mode: str = "segment",
    generator: torch.Generator | None = None,
    random_crop: bool = True,
    released_loss_offset: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The reward stages' loss (paper §4.2): decomposed, reweighted preference score.

    `images` (B, 3, H, W) in [0, 1] (gradients flow back to them), `prompts` B strings,
    `direction` the V provider, `text_irrelevant_weight` w in [0, 1] or `"auto"`. Returns
    `loss = 0.5 (1 - mean x . (t - (1 - w) eta V))` and floats to log (means over this process's
    batch): `score` (w = 1), `score_text_relevant` (x . t_perp), `score_text_irrelevant`
    (x . eta V), `score_reweighted`, `eta`, `text_relevant_norm` (|t_perp|), `text_irrelevant_weight`.
    """
    weight = check_text_irrelevant_weight(text_irrelevant_weight)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    text_embeds = preference_model.embed_texts(prompts, text_mode).float()  # (B, E)
    image_embeds = preference_model.embed_images(images, generator, random_crop)  # (B, E), float32
    v = direction(text_embeds).to(text_embeds.device)
    parts = decompose(text_embeds, v)
    if weight == "auto":  # from the mean eta of the whole batch over all processes, as V is
        weight = auto_text_irrelevant_weight(direction.gathered_mean(parts.eta[:, None])[0].item())
    scores = reweighted_score(image_embeds, text_embeds, v, weight)  # (B,)
    loss = preference_loss(scores, weight, released_offset=released_loss_offset)
    with torch.no_grad():
        logs = {
            "score": (image_embeds * text_embeds).sum(-1).mean().item(),
            "score_text_relevant": (image_embeds * parts.text_relevant).sum(-1).mean().item(),
            "score_text_irrelevant": (image_embeds * parts.text_irrelevant).sum(-1).mean().item(),
            "score_reweighted": scores.mean().item(),
            "eta": parts.eta.mean().item(),
            "text_relevant_norm": parts.text_relevant.norm(dim=-1).mean().item(),
            "text_irrelevant_weight": float(weight),
        }
    return loss, logs


class DecomposedReward:
    """The reward stages' scorer (paper §4.2): a preference model, a V provider and a `RewardConfig`.

    `__call__(images (B, 3, H, W) in [0, 1], prompts, generator)` -> `(loss, logs)` as
    `decomposed_reward`. `w` and the modes are validated at construction, so a bad flag fails before
    any training. `state_dict` / `load_state_dict` carry the `ema` direction for checkpoints
    (`Stage.stateful` in the training loop).
    """

    def __init__(
        self,
        config: RewardConfig,
        accelerator: Any = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        segmenter: str = "sentences",
        preference_model: PreferenceModel | None = None,
    ):
        self.config = config
        self.weight = check_text_irrelevant_weight(config.text_irrelevant_weight)  # RewardConfig checked the rest
        self.direction = CommonDirection(
            config.common_direction, accelerator, config.common_direction_ema_decay, config.common_direction_file
        )
        self.preference_model = preference_model or load_preference_model(config.reward_model, device, dtype, segmenter)

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss and log values for decoded images and their prompts (see `decomposed_reward`)."""
        return decomposed_reward(
            self.preference_model,
            images,
            prompts,
            self.direction,
            self.weight,
            self.config.text_mode,
            generator,
            self.config.random_crop,
            self.config.released_loss_offset,
        )

    def state_dict(self) -> dict[str, Any]:
        """State of the common direction provider (only `ema` has any)."""
        return self.direction.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.direction.load_state_dict(state)
