"""Analyse a preference model's text embeddings and the decomposition (paper §4, Fig. 2, Table 1).

    python -m longalign.analyze_preference --model denscore --prompts prompts.txt --images imgs/ --out analysis/

Inputs: `--prompts` is a text file with one prompt per line (blank lines are skipped, as in
sample.py, so its `--prompt_file` and images pair up).
`--images` is a folder of images (png, jpg, jpeg, webp, bmp, gif, tif, tiff; any size or mode,
converted to RGB) matched to the prompts:
- if every file name (without extension) is an integer, image `k.*` belongs to prompt line `k`
  (0-based; `000012.png` is 12) and the indices must be exactly 0..N-1;
- otherwise the files sorted by name are matched to the prompts in order.
A count mismatch is a user error (exit 2).

Writes into `--out`:
- `eta.json`, `eta_hist.png`: eta = t . V of every prompt (V = common direction of the set), the
  paper's Fig. 2b (also per segment in `segment` mode);
- `decomposition.json`, `decomposition.png`: original x . t, text-relevant x . t_perp and
  text-irrelevant x . eta V scores for paired (x_i, t_i) and unpaired (x_i, t_{i+1 mod N}) pairs;
- `retrieval.json`, `retrieval.md`: text->image R@1 for the original vs text-relevant text
  embedding, in `single` vs `segment`-average mode (paper Table 1 protocol).
An `--out` that holds an earlier analysis is refused unless `--overwrite`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import torch

from .data import to_rgb
from .loading import UserError, check_device, check_folder_path, cli_entry, read_prompt_file
from .reward import TEXT_MODES, PreferenceModel, common_direction, decompose, load_preference_model
from .text_encoding import SEGMENTERS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def match_images(folder: str, count: int) -> list[Path]:
    """Image files of `folder` in prompt order (rule in the module docstring); mismatch -> `UserError`."""
    if not os.path.isdir(folder):
        raise UserError(f"images folder not found: '{folder}'")
    files = [p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if len(files) != count:
        raise UserError(f"'{folder}' holds {len(files)} images but the prompts file has {count} prompts")
    if files and all(re.fullmatch(r"\d+", p.stem) for p in files):
        by_index = {int(p.stem): p for p in files}
        if sorted(by_index) != list(range(count)):
            raise UserError(f"images in '{folder}' are named by index but do not cover 0..{count - 1} exactly once")
        return [by_index[k] for k in range(count)]
    return sorted(files, key=lambda p: p.name)


def load_image(path: Path) -> torch.Tensor:
    """An image file of any size or mode -> (3, H, W) float in [0, 1] (RGB)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise UserError(f"could not read image '{path}' ({error})") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@torch.no_grad()
def embed_image_files(
    model: PreferenceModel, paths: list[Path], batch_size: int, generator: torch.Generator, random_crop: bool
) -> torch.Tensor:
    """Image files -> normalised embeddings (N, E); each image is cropped/resized alone, then batched."""
    from tqdm.auto import tqdm

    chunks = []
    for start in tqdm(range(0, len(paths), batch_size), desc="images", unit="batch"):
        batch = [model.prepare_images(load_image(p)[None], generator, random_crop) for p in paths[start : start + batch_size]]
        chunks.append(model.embed_images(torch.cat(batch).to(model.device), random_crop=False).cpu())
    return torch.cat(chunks)


@torch.no_grad()
def embed_prompts(model: PreferenceModel, prompts: list[str], mode: str, batch_size: int):
    """Prompts -> (prompt embeddings (N, E), segment embeddings (S, E)) in `mode`."""
    from tqdm.auto import tqdm

    prompt_chunks, segment_chunks = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"texts ({mode})", unit="batch"):
        encoded = model.encode_texts(prompts[start : start + batch_size], mode)
        prompt_chunks.append(encoded.prompt_embeds.cpu())
        segment_chunks.append(encoded.segment_embeds.cpu())
    return torch.cat(prompt_chunks), torch.cat(segment_chunks)


def _stats(values: torch.Tensor) -> dict[str, float]:
    values = values.double()
    return {
        "mean": values.mean().item(),
        "std": values.std(unbiased=False).item(),
        "min": values.min().item(),
        "max": values.max().item(),
    }


def recall_at_1(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """Text->image R@1 (paper Table 1): share of prompts whose own image scores highest. (N,E),(N,E) -> float."""
    scores = text_embeds.float() @ image_embeds.float().T  # (N texts, N images)
    return (scores.argmax(dim=1) == torch.arange(len(text_embeds))).float().mean().item()


def analyse(image_embeds: torch.Tensor, texts: dict[str, tuple[torch.Tensor, torch.Tensor]], mode: str) -> dict:
    """All numbers of the report: eta stats, paired/unpaired decomposition scores, R@1 table."""
    text_embeds, segment_embeds = texts[mode]
    v = common_direction(text_embeds)
    parts = decompose(text_embeds.float(), v)
    eta = {"mode": mode, "prompts": len(text_embeds), "eta": _stats(parts.eta)}
    eta["text_relevant_norm"] = _stats(parts.text_relevant.norm(dim=-1))
    if mode == "segment":
        eta["segments"] = len(segment_embeds)
        eta["segment_eta"] = _stats(segment_embeds.float() @ common_direction(segment_embeds))

    shifted = torch.roll(torch.arange(len(text_embeds)), -1)  # unpaired: image i with text i+1 (mod N)
    decomposition: dict = {"mode": mode, "unpaired_rule": "image i with prompt i+1 (mod N)"}
    for pairing, index in (("paired", torch.arange(len(text_embeds))), ("unpaired", shifted)):
        x = image_embeds.float()
        decomposition[pairing] = {
            "original": (x * text_embeds[index].float()).sum(-1),
            "text_relevant": (x * parts.text_relevant[index]).sum(-1),
            "text_irrelevant": (x * parts.text_irrelevant[index]).sum(-1),
        }

    retrieval = {}
    for text_mode, (embeds, _) in texts.items():
        relevant = decompose(embeds.float(), common_direction(embeds)).text_relevant
        retrieval[text_mode] = {
            "original": recall_at_1(image_embeds, embeds),
            "text_relevant": recall_at_1(image_embeds, relevant),
        }
    return {"eta": eta, "eta_values": parts.eta, "decomposition": decomposition, "retrieval": retrieval}


OUTPUT_FILES = ("eta.json", "eta_hist.png", "decomposition.json", "decomposition.png", "retrieval.json", "retrieval.md")


def write_outputs(result: dict, out: Path, model_name: str) -> list[Path]:
    """Write `OUTPUT_FILES` (JSON, PNG and markdown); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []

    eta_json = out / "eta.json"
    eta_json.write_text(json.dumps({"model": model_name, **result["eta"]}, indent=2))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(result["eta_values"].numpy(), bins=30, color="tab:blue")
    ax.set_xlabel("eta = t . V")
    ax.set_ylabel("prompts")
    ax.set_title(f"{model_name}: eta ({result['eta']['mode']}), mean {result['eta']['eta']['mean']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "eta_hist.png", dpi=100)
    plt.close(fig)
    written += [eta_json, out / "eta_hist.png"]

    decomposition = result["decomposition"]
    summary = {"model": model_name, "mode": decomposition["mode"], "unpaired_rule": decomposition["unpaired_rule"]}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, part in zip(axes, ("original", "text_relevant", "text_irrelevant")):
        for pairing, color in (("paired", "tab:green"), ("unpaired", "tab:red")):
            values = decomposition[pairing][part]
            summary.setdefault(pairing, {})[part] = _stats(values)
            ax.hist(values.numpy(), bins=20, alpha=0.6, color=color, label=pairing)
        gap = summary["paired"][part]["mean"] - summary["unpaired"][part]["mean"]
        summary.setdefault("paired_minus_unpaired", {})[part] = gap
        ax.set_title(f"{part.replace('_', '-')} score (gap {gap:.3f})")
        ax.set_xlabel("score")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "decomposition.png", dpi=100)
    plt.close(fig)
    (out / "decomposition.json").write_text(json.dumps(summary, indent=2))
    written += [out / "decomposition.json", out / "decomposition.png"]

    retrieval = result["retrieval"]
    (out / "retrieval.json").write_text(json.dumps({"model": model_name, "metric": "text->image R@1", **retrieval}, indent=2))
    rows = [
        f"# Text->image R@1 ({model_name}, {result['eta']['prompts']} pairs)",
        "",
        "| text embedding | Single | Average |",
        "|---|---|---|",
    ]
    for part in ("original", "text_relevant"):
        cells = [f"{100 * retrieval[mode][part]:.2f}" for mode in ("single", "segment")]
        rows.append(f"| {part.replace('_', '-')} | {cells[0]} | {cells[1]} |")
    (out / "retrieval.md").write_text("\n".join(rows) + "\n")
    written += [out / "retrieval.json", out / "retrieval.md"]
    return written


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="denscore", help="preference model: registry name, open_clip:MODEL[:CKPT] or folder")
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line")
    parser.add_argument("--images", required=True, help="folder of images matched to the prompts (see above)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--mode", default="segment", choices=TEXT_MODES, help="text mode for the eta and decomposition plots")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random crop generator")
    parser.add_argument("--crop", default="none", choices=("none", "random"), help="random: the training-time 504/512 crop")
    parser.add_argument("--segmenter", default="sentences", choices=SEGMENTERS, help="segmenter for segment mode")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier analysis in --out")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    check_device(args.device)
    check_folder_path(args.out, "--out")  # before the embeddings are computed, not after
    earlier = [name for name in OUTPUT_FILES if (Path(args.out) / name).exists()]
    if earlier and not args.overwrite:
        raise UserError(f"--out '{args.out}' holds an earlier analysis ({earlier[0]}); pass another --out, or --overwrite")

    prompts = read_prompt_file(args.prompts, "--prompts")
    if len(prompts) < 2:  # V would be the one prompt's own direction: eta = 1, t_perp = 0, R@1 = 1
        raise UserError(f"--prompts '{args.prompts}' holds {len(prompts)} prompt; the analysis needs at least 2")
    paths = match_images(args.images, len(prompts))
    model = load_preference_model(args.model, device=args.device, segmenter=args.segmenter)
    generator = torch.Generator().manual_seed(args.seed)
    image_embeds = embed_image_files(model, paths, args.batch_size, generator, args.crop == "random")
    texts = {mode: embed_prompts(model, prompts, mode, args.batch_size) for mode in ("single", "segment")}
    result = analyse(image_embeds, texts, args.mode)
    for path in write_outputs(result, Path(args.out), args.model):
        print(path)


if __name__ == "__main__":
    main()
