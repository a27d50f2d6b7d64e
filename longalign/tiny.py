"""Tiny random-weight models in the hub's folder layouts, built offline.

`python -m longalign.tiny DIR` writes:

- `DIR/sd15/`: an SD1.5 pipeline folder (`model_index.json`, `unet/`, `vae/` with scale factor 8,
  `text_encoder/`, `tokenizer/` with the real CLIP BPE vocabulary that open_clip ships,
  `scheduler/` with SD1.5's schedule);
- `DIR/t5/`: a T5 encoder with a T5 tokenizer (sentencepiece model trained in memory);
- `DIR/adapter/`: a `TextAdapter` from the tiny T5 width to the tiny CLIP width;
- `DIR/preference/`: a CLIP preference model (transformers `CLIPModel` + tokenizer + processor).

The production loaders read these folders by path, unchanged. Everything is small enough that a
training step takes well under a second on a CPU.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import json
import os
from pathlib import Path

import torch

from .adapter import TextAdapter
from .loading import UserError, cli_entry

TEXT_WIDTH = 32  # tiny CLIP hidden size = UNet cross-attention width
T5_WIDTH = 32
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    clip_sample=False,
)

_T5_CORPUS = (
    "A red circle sits in the top left corner of a dark room. The photograph shows a tall man "
    "holding a blue umbrella while rain falls on the busy street. Two cats sleep on a wooden "
    "table next to a window; sunlight paints warm stripes across their fur. In the background, "
    "mountains rise above a quiet lake, and small boats drift near the shore. The painting uses "
    "soft colors: green, yellow, purple, orange and white. Dr. Smith measured 3.5 m of rope!"
)


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character map of GPT-2/CLIP BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def write_clip_tokenizer(folder: Path) -> None:
    """Write SD1.5's CLIP tokenizer folder (49408 tokens) from the BPE file that open_clip ships.

    The files are those of the hub's `tokenizer/` folder: `vocab.json`, `merges.txt`,
    `tokenizer_config.json` and `special_tokens_map.json` (no `tokenizer.json`), so loading it
    takes the same path as loading the real one.
    """
    spec = importlib.util.find_spec("open_clip")  # located, not imported: open_clip's imports are not needed here
    if spec is None or spec.origin is None:
        raise UserError("open_clip_torch is not installed; its BPE file is the CLIP tokenizer's vocabulary")
    bpe_path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(merge) for merge in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_t5_tokenizer(folder: Path) -> int:
    """Train a small sentencepiece model in memory and save it as a T5 tokenizer; returns its size."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    sentences = [sentence.strip() for sentence in _T5_CORPUS.replace(";", ".").split(".") if sentence.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 20),
        model_writer=model,
        vocab_size=120,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    tokenizer = T5Tokenizer.from_pretrained(folder, extra_ids=10, model_max_length=512)
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def clip_text_config(**overrides):
    from transformers import CLIPTextConfig

    config = dict(
        vocab_size=49408,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_WIDTH,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    config.update(overrides)
    return CLIPTextConfig(**config)


def tiny_unet():
    """A two-level UNet2DConditionModel with SD1.5's block types (cross-attention width 32)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_vae():
    """An AutoencoderKL with four levels (scale factor 8) and SD's latent scaling."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )


def write_sd15(folder: Path) -> None:
    """An SD1.5-layout pipeline folder with tiny random weights."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer_folder = folder / "tokenizer"
    write_clip_tokenizer(tokenizer_folder)
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(clip_text_config()),
        tokenizer=None,
        unet=tiny_unet(),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)  # writes every component but the tokenizer, written above
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def write_t5(folder: Path) -> None:
    """A two-layer T5 encoder (width 32) with its tokenizer."""
    from transformers import T5Config, T5EncoderModel

    vocab_size = write_t5_tokenizer(folder)
    config = T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    T5EncoderModel(config).save_pretrained(folder)


def write_adapter(folder: Path) -> None:
    TextAdapter(in_dim=T5_WIDTH, int_dim=24, out_dim=TEXT_WIDTH).save_pretrained(folder)


def write_preference(folder: Path, clip_tokenizer: Path) -> None:
    """A CLIPModel preference model (32 px images) with the CLIP tokenizer and image processor."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    config = CLIPConfig(text_config=clip_text_config().to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(clip_tokenizer).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


MARKER = "tiny_models.json"  # in a root this module wrote (so writing there again is safe)


def check_random_weights_root(root: Path, names: tuple[str, ...], markers: tuple[str, ...] = (MARKER,)) -> None:
    """A `UserError` when random-weight models would overwrite model folders under `root` that no
    writer of random weights left there (none of `markers`): e.g. a real SD1.5 download."""
    if any((root / marker).exists() for marker in markers):
        return
    for name in names:
        if (root / name).is_dir() and any((root / name).iterdir()):
            raise UserError(
                f"'{root / name}' holds files this tool did not write (no {markers[0]} beside it); choose an empty "
                "folder for the random-weight models"
            )


def write_tiny_models(root: str | os.PathLike, seed: int = 0, markers: tuple[str, ...] = (MARKER,)) -> dict[str, Path]:
    """Write every tiny model folder under `root`; returns {name: folder}. Model folders that no
    writer of `markers` left there are never overwritten (`check_random_weights_root`)."""
    root = Path(root)
    folders = {name: root / name for name in ("sd15", "t5", "adapter", "preference")}
    check_random_weights_root(root, tuple(folders), markers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        write_sd15(folders["sd15"])
        write_t5(folders["t5"])
        write_adapter(folders["adapter"])
        write_preference(folders["preference"], folders["sd15"] / "tokenizer")
    (root / MARKER).write_text(json.dumps({"seed": seed}))
    return folders


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, folder in write_tiny_models(args.dir, args.seed).items():
        print(f"{name:>10}: {folder}")


if __name__ == "__main__":
    main()
