"""Training data: caption tables, image transforms, bad-row accounting and a resumable sampler.

METHOD.md §6: the LongAlign data (`luping-liu/LongAlign` on the hub, ~2.27M rows of relative
image `path` + long `caption`, images downloaded separately under an image root) or the user's
own data (a `.jsonl` / `.csv` / `.parquet` file with the same two columns, or a folder of images
with a `.txt` caption beside each). Images are resized (shorter side to 512), center-cropped and
mapped to [-1, 1]; long captions are kept whole, paragraph breaks included (`normalize_caption`).

How the training loop uses this module (one process per GPU, `accelerate launch`):

    settings = DataSettings(dataset=..., image_root=...)
    dataset = build_train_dataset(settings)                      # fails fast on a wrong image root
    sampler = ResumableSampler(len(dataset), seed, num_replicas=accelerator.num_processes,
                               rank=accelerator.process_index)
    loader = make_dataloader(dataset, sampler, batch_size, num_workers)   # NOT accelerator.prepare'd
    monitor = BadRowMonitor.from_settings(settings, rows_per_epoch=sampler.num_samples * accelerator.num_processes)
    # on resume: sampler.load_state_dict(saved["sampler"]); monitor.load_state_dict(saved["bad_rows"])
    while not done:
        for batch in loader:
            counts = accelerator.gather(torch.tensor([monitor.batch_counts(batch)], device=accelerator.device))
            monitor.update(batch, counts.sum(0).tolist())  # all ranks' rows: warns, raises UserError if too many
            sampler.advance(batch["num_rows"])  # rows consumed, bad ones included
            pixel_values = batch["pixel_values"].to(accelerator.device)   # (b, 3, R, R), b may be < batch_size
            ...                                 # checkpoint: {"sampler": sampler.state_dict(), ...}
        sampler.next_epoch()

Why the loader is not passed to `accelerator.prepare`: with more than one process,
`accelerate.data_loader.prepare_data_loader` wraps the loader's batch sampler in a
`BatchSamplerShard` that deals batches out to the processes again, so a sampler that already
returns only this rank's share would be sharded twice (each rank would see 1/N of its 1/N), and
accelerate's own skip/resume logic would count batches, not the rows this sampler tracks. Building
one DataLoader per rank with this sampler keeps the order a pure function of (seed, epoch, rank) and
the resume exact; the loop moves tensors to `accelerator.device` itself.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .loading import UserError, error_line, resolve_source
from .text_encoding import paragraphs

logger = logging.getLogger(__name__)

LONGALIGN_DATASET = "luping-liu/LongAlign"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
def mixed_seed(*parts: int) -> int:
    """One generator seed from several integers (e.g. (seed, epoch)), well mixed by SHA-256.

    torch's CPU generator keeps only the low 32 bits of a seed, so packing `seed * 2**32 + epoch`
    would make the seed irrelevant; hashing spreads every part over the bits it keeps.
    """
    digest = hashlib.sha256(":".join(str(int(part)) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


# ---------------------------------------------------------------------------------- settings
@dataclass
class DataSettings:
    """Where the training pairs come from and how images are prepared (METHOD.md §6).

    `dataset` is a hub id (default: the LongAlign data, which needs `image_root`), a local
    `.jsonl`/`.csv`/`.parquet` file (image paths relative to `image_root`, default: the file's
    folder) or a folder of images with a `.txt` caption beside each. Images become
    (3, resolution, resolution) tensors in [-1, 1].
    """

    dataset: str = field(
        default=LONGALIGN_DATASET,
        metadata={"help": "Hub dataset id, a .jsonl/.csv/.parquet file, or a folder of images with .txt captions."},
    )
    image_root: str | None = field(
        default=None,
        metadata={"help": "Folder the table's image paths are relative to (default: the table file's folder)."},
    )
    resolution: int = field(default=512, metadata={"help": "Training image size (square)."})
    caption_column: str = field(default="caption", metadata={"help": "Column holding the caption."})
    image_column: str = field(default="path", metadata={"help": "Column holding the relative image path."})
    center_crop: bool = field(default=True, metadata={"help": "Center crop after resizing (else a seeded random crop)."})
    random_flip: bool = field(default=False, metadata={"help": "Seeded random horizontal flip."})
    augment_seed: int = field(default=0, metadata={"help": "Seed of the random crop/flip (fixed per image)."})
    max_bad_fraction: float = field(
        default=0.05,
        metadata={"help": "Stop with an error when more than this fraction of rows has a missing/unreadable image or bad caption."},
    )
    min_rows_before_check: int = field(
        default=200, metadata={"help": "Rows seen before the bad-row fraction is checked (or one full epoch)."}
    )
    warn_every_rows: int = field(default=10000, metadata={"help": "At most one bad-row warning per this many rows."})
    split: str = field(
        default="train",
        metadata={"help": "dataset split, in datasets' slice syntax: train, train[5000:] (leaves out the first 5000 "
                  "rows), train[:100]+train[200:]; an image folder is the split train"},
    )  # fmt: skip
    max_rows: int | None = field(default=None, metadata={"help": "Use only the first N rows (smoke runs)."})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder (default: the HF cache)."})
    fast_jpeg_decode: bool = field(
        default=True,
        metadata={"help": "Let the JPEG decoder downscale by a power of two while staying >= resolution (faster)."},
    )

    def __post_init__(self) -> None:
        if self.resolution <= 0 or self.resolution % 8:
            raise UserError(f"--resolution must be a positive multiple of 8 (the VAE's downsampling), got {self.resolution}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise UserError(f"--max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.max_rows is not None and self.max_rows <= 0:
            raise UserError(f"--max_rows must be positive, got {self.max_rows}")
        if self.augment_seed < 0:
            raise UserError(f"--augment_seed must be non-negative, got {self.augment_seed}")


# ------------------------------------------------------------------------------ caption table
def normalize_caption(caption: str) -> str:
    """A caption with its whitespace made regular and its paragraphs kept: each paragraph's
    whitespace collapsed to one space, the paragraphs joined by one blank line. The `sentences`
    segmenter ends a segment at a paragraph break (METHOD.md §1), so training sees the breaks that
    `sample.py --prompt` sees; CLIP's and T5's tokenizers read a blank line as a space."""
    return "\n\n".join(paragraphs(caption))


def _looks_like_file(name: str) -> bool:
    return Path(name).suffix.lower() in TABLE_FORMATS


def _image_folder_table(folder: Path) -> tuple[list[dict[str, str]], int]:
    """Rows {path, caption} for every image under `folder` with a `.txt` caption beside it, and
    the number of images without one. A caption file that is not UTF-8 text gives caption None,
    which training skips and counts as a bad caption."""
    rows, uncaptioned = [], 0
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            uncaptioned += 1
            continue
        try:
            caption = caption_file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            caption = None
        rows.append({"path": image.relative_to(folder).as_posix(), "caption": caption})
    return rows, uncaptioned


def _load_with_datasets(settings: DataSettings, kind: str | None, source: str):
    import datasets

    kwargs: dict[str, Any] = {"split": settings.split, "cache_dir": settings.cache_dir}
    if os.path.isfile(source) and os.path.getsize(source) == 0:  # datasets says only 'StopIteration'
        raise UserError(f"dataset '{source}' is an empty file")
    try:
        if kind is None:
            return datasets.load_dataset(source, **kwargs)
        return datasets.load_dataset(kind, data_files=source, **kwargs)
    except (ValueError, KeyError) as error:  # bad split name, unparsable or empty file
        if "corresponds to no data" in str(error) and os.path.exists(source):
            raise UserError(f"dataset '{source}' has no rows") from None
        reason = error_line(error, 200)
        raise UserError(f"could not read dataset '{source}' (split '{settings.split}'): {reason}") from None
    except Exception as error:  # hub/connection/parse errors come in many classes
        reason = error_line(error, 200)
        hint = "" if os.path.exists(source) else "; with no hub access, download it elsewhere and pass the local file"
        raise UserError(f"could not read dataset '{source}': {reason}{hint}") from None


def _select_split(table, split: str, source: str):
    """The rows of an image folder's table that `split` names, in datasets' split syntax (the
    folder is the one split `train`, as datasets' imagefolder names it: `train[5000:]`,
    `train[:10%]`, `train[:100]+train[200:]`), so `--split` holds rows out of any dataset kind."""
    import datasets

    try:
        ranges = datasets.ReadInstruction.from_spec(split).to_absolute({"train": len(table)})
    except ValueError as error:
        raise UserError(f"--split '{split}' does not fit the image folder '{source}': {error}") from None
    return table.select([index for part in ranges for index in range(part.from_, part.to)])


def load_caption_table(settings: DataSettings, with_images: bool = True):
    """Load the (path, caption) table named by `settings.dataset` (METHOD.md §6).

    Returns a `datasets.Dataset` with exactly the columns `path` and `caption` (renamed from
    `settings.image_column` / `settings.caption_column`), or `caption` alone without
    `with_images` (the reward stages: a prompt table needs no image column), in file order, optionally cut to
    `settings.max_rows`. Captions are returned raw; `LongCaptionImageDataset` normalises them
    when a row is read, so the 2.27M-row hub table needs no pass over all rows here. A missing
    file or folder, missing columns (the columns found are named) or an empty table raise
    `UserError`. Where the images are is `resolve_image_root(settings)`.
    """
    import datasets

    source = os.path.expanduser(settings.dataset)
    folder_rows, uncaptioned = _image_folder_table(Path(source)) if os.path.isdir(source) else ([], 0)
    if folder_rows:
        if uncaptioned:
            logger.warning("%d images under %s have no .txt caption beside them and are not used", uncaptioned, source)
        table = _select_split(datasets.Dataset.from_list(folder_rows), settings.split, source)
        if not with_images:
            table = table.select_columns(["caption"])
    else:
        if os.path.isfile(source):
            suffix = Path(source).suffix.lower()
            if suffix not in TABLE_FORMATS:
                raise UserError(
                    f"dataset file '{source}' has an unknown extension; use one of {', '.join(sorted(TABLE_FORMATS))}"
                )
            table = _load_with_datasets(settings, TABLE_FORMATS[suffix], source)
        elif os.path.isdir(source):
            if not any(p.suffix.lower() in TABLE_FORMATS for p in Path(source).rglob("*")):
                raise UserError(
                    f"dataset folder '{source}' has no images with a .txt caption beside them ({uncaptioned} images "
                    f"without one) and no .jsonl/.csv/.parquet files"
                )
            table = _load_with_datasets(settings, None, source)
        elif _looks_like_file(source):
            raise UserError(f"dataset not found: '{settings.dataset}' is not an existing file")
        else:  # a hub id (resolve_source refuses anything not shaped like one)
            table = _load_with_datasets(settings, None, resolve_source(settings.dataset, "dataset"))
        image_column, caption_column = settings.image_column, settings.caption_column
        if with_images and image_column == caption_column:
            raise UserError(f"--image_column and --caption_column are both '{image_column}'; they must differ")
        wanted = {"path": image_column, "caption": caption_column} if with_images else {"caption": caption_column}
        missing = [name for name in wanted.values() if name not in table.column_names]
        if missing:
            raise UserError(
                f"dataset '{settings.dataset}' has no column(s) {', '.join(map(repr, missing))}; columns found: "
                f"{', '.join(map(repr, table.column_names))} (choose with --image_column / --caption_column)"
            )
        table = table.select_columns(list(wanted.values()))
        if list(wanted.values()) != list(wanted):
            # Two-step rename so that swapped names (path <-> caption) cannot collide.
            table = table.rename_columns({column: f"__{name}" for name, column in wanted.items()})
            table = table.rename_columns({f"__{name}": name for name in wanted})
    if len(table) == 0:
        raise UserError(f"dataset '{settings.dataset}' (split '{settings.split}') has no rows")
    if settings.max_rows is not None and settings.max_rows < len(table):
        table = table.select(range(settings.max_rows))
    return table


def resolve_image_root(settings: DataSettings) -> str:
    """The folder the table's image paths are relative to: `image_root`, else the table's folder.

    A hub dataset has no folder of its own, so it needs `--image_root` (its images are
    downloaded separately); a given root that does not exist is an error.
    """
    if settings.image_root is not None:
        root = os.path.expanduser(settings.image_root)
        if not os.path.isdir(root):
            raise UserError(f"--image_root '{settings.image_root}' is not an existing folder")
        return root
    source = os.path.expanduser(settings.dataset)
    if os.path.isdir(source):
        return source
    if os.path.isfile(source):
        return os.path.dirname(os.path.abspath(source))
    raise UserError(
        f"--image_root is required with the hub dataset '{settings.dataset}': download its images "
        f"(for LongAlign: SAM, COCO2017, LLaVA, JourneyDB) and pass the folder their paths are relative to"
    )


def check_image_root(table, image_root: str, max_bad_fraction: float, num_rows: int = 100) -> None:
    """Fail fast when the first `num_rows` image paths are mostly missing under `image_root`.

    Only checks that the files exist (cheap), before any model is loaded; unreadable files and
    bad captions are caught later by `BadRowMonitor`. Raises `UserError` naming an example path.
    """
    count = min(num_rows, len(table))
    paths = table.select(range(count))["path"] if hasattr(table, "select") else [row["path"] for row in table[:count]]
    missing = [p for p in paths if not isinstance(p, str) or not os.path.isfile(os.path.join(image_root, p))]
    if missing and len(missing) / count > max_bad_fraction:
        example = os.path.join(image_root, str(missing[0]))
        raise UserError(
            f"{len(missing)} of the first {count} images are missing under '{image_root}' (e.g. '{example}'); "
            f"check --image_root"
        )


# ---------------------------------------------------------------------------- image dataset
class BadRow(NamedTuple):
    """A row that could not be used: `reason` is 'missing_image', 'unreadable_image' or 'bad_caption'."""

    index: int
    reason: str
    detail: str


BAD_ROW_REASONS = {
    "missing_image": "missing images",
    "unreadable_image": "unreadable images",
    "bad_caption": "empty or non-text captions",
}


def augment_generator(seed: int, index: int) -> torch.Generator:
    """The generator of row `index`'s random crop/flip: seeded by (seed, index), same in any worker."""
    return torch.Generator().manual_seed(mixed_seed(seed, index))


def to_rgb(image):
    """A PIL image of any mode -> RGB. 16- and 32-bit greyscale (`I;16`, `I`: a 16-bit PNG) is
    scaled from the 16-bit range (unless it holds 8-bit values) and float greyscale (`F`) from
    [0, 1] (or clipped to [0, 255]); PIL's own conversion clips them, so most 16-bit photos
    became pure white."""
    import numpy as np
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if image.mode.startswith("I;16") or (image.mode == "I" and array.max(initial=0.0) > 255):
            array = array / 257.0  # (an `I` image may hold 8-bit values)
        elif image.mode == "F" and array.max(initial=0.0) <= 1.0:
            array = array * 255.0
    else:
        return image.convert("RGB")
    return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8), "L").convert("RGB")


def prepare_image(image, settings: DataSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """PIL image -> (3, R, R) float tensor in [-1, 1], R = `settings.resolution` (METHOD.md §6).

    Converts to RGB (`to_rgb`), resizes the shorter side to R (bilinear, as released), then center-crops
    (or crops at a position drawn from `generator` when `settings.center_crop` is False) and
    optionally flips horizontally (a draw from `generator`).
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    size = settings.resolution
    image = to_rgb(image)
    image = TF.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    width, height = image.size
    if settings.center_crop:
        image = TF.center_crop(image, [size, size])
    else:
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
        image = TF.crop(image, top, left, size, size)
    pixels = TF.pil_to_tensor(image).float().div(127.5).sub(1.0)  # (3, R, R) in [-1, 1]
    if settings.random_flip:
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        if bool(torch.rand((), generator=generator) < 0.5):
            pixels = pixels.flip(-1)
    return pixels


class LongCaptionImageDataset(Dataset):
    """Image/long-caption pairs read lazily from a caption table (METHOD.md §6).

    `dataset[i]` is `{"pixel_values": (3, R, R) in [-1, 1], "caption": str, "index": i}`, or a
    `BadRow` when the image is missing/unreadable or the caption is empty or not a string (the
    collate function drops and counts those; the align stage makes its own empty captions by
    caption dropout, so an empty caption in the data is treated as a mistake). Random crop/flip
    draws come from a generator seeded by (augment_seed, index), so any worker gives the same
    example (the augmentation of an image is fixed across epochs).
    """

    def __init__(self, table, image_root: str, settings: DataSettings) -> None:
        self.table = table
        self.image_root = image_root
        self.settings = settings

    def __len__(self) -> int:
        return len(self.table)

    def _open(self, path: str):
        from PIL import Image, ImageOps

        image = Image.open(path)
        if self.settings.fast_jpeg_decode and image.format == "JPEG":
            image.draft("RGB", (self.settings.resolution, self.settings.resolution))
        image = ImageOps.exif_transpose(image)  # camera photos: honour the orientation tag
        image.load()
        return image

    def __getitem__(self, index: int) -> dict[str, Any] | BadRow:
        from PIL import Image, UnidentifiedImageError

        index = int(index)
        row = self.table[index]
        caption, relative_path = row["caption"], row["path"]
        if not isinstance(caption, str) or not caption.strip():  # named by its image too (a folder's .txt)
            return BadRow(index, "bad_caption", f"row {index} ({relative_path}): caption {caption!r:.40}")
        if not isinstance(relative_path, str) or not relative_path:
            return BadRow(index, "missing_image", f"row {index}: path {relative_path!r:.40}")
        path = os.path.join(self.image_root, relative_path)
        try:
            image = self._open(path)
        except FileNotFoundError:
            return BadRow(index, "missing_image", path)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as error:
            return BadRow(index, "unreadable_image", f"{path} ({type(error).__name__})")
        try:
            pixel_values = prepare_image(image, self.settings, augment_generator(self.settings.augment_seed, index))
        except (OSError, ValueError) as error:  # truncated data surfaces during resize on some formats
            return BadRow(index, "unreadable_image", f"{path} ({type(error).__name__})")
        return {"pixel_values": pixel_values, "caption": normalize_caption(caption), "index": index}


class CaptionDataset(Dataset):
    """Captions alone, for the reward stages, which generate their own images (METHOD.md §5).

    `dataset[i]` is `{"caption": str, "index": i}` or a `BadRow` for an empty or non-string
    caption; batches come from the same `collate_examples` (without `pixel_values`).
    """

    def __init__(self, table, settings: DataSettings) -> None:
        self.table = table
        self.settings = settings

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any] | BadRow:
        index = int(index)
        caption = self.table[index]["caption"]
        if not isinstance(caption, str) or not caption.strip():
            return BadRow(index, "bad_caption", f"row {index}: caption {caption!r:.40}")
        return {"caption": normalize_caption(caption), "index": index}


def build_train_dataset(settings: DataSettings) -> LongCaptionImageDataset:
    """Caption table + image root + fail-fast check -> a `LongCaptionImageDataset` (METHOD.md §6)."""
    table = load_caption_table(settings)
    image_root = resolve_image_root(settings)
    check_image_root(table, image_root, settings.max_bad_fraction)
    return LongCaptionImageDataset(table, image_root, settings)


# -------------------------------------------------------------------------------- collate
def collate_examples(
    items: Sequence[dict[str, Any] | BadRow], resolution: int, split_caption: Callable[[str], list[str]] | None = None
) -> dict[str, Any]:
    """Stack the good examples of a batch and report the bad ones.

    Returns `pixel_values` (b, 3, R, R), `caption` (list of b str), `index` (b,) int64 dataset
    rows, `num_rows` (the rows this batch consumed, bad ones included: what the sampler must
    advance by) and `bad_rows` (list of `BadRow`). b can be 0 when every row was bad. Because the
    counts travel inside the batch, they reach the main process from DataLoader workers. With
    `split_caption` (`SegmentCLIPEncoder.splitter()`), also `segments`: each caption's CLIP
    segments (b lists of str), split in the DataLoader workers rather than by the training step.
    """
    good = [item for item in items if isinstance(item, dict)]
    bad = [item for item in items if isinstance(item, BadRow)]
    batch: dict[str, Any] = {}
    if good and "pixel_values" in good[0]:
        batch["pixel_values"] = torch.stack([item["pixel_values"] for item in good])
    elif not good:
        batch["pixel_values"] = torch.empty(0, 3, resolution, resolution)
    if split_caption is not None:
        batch["segments"] = [split_caption(item["caption"]) for item in good]
    return batch | {
        "caption": [item["caption"] for item in good],
        "index": torch.tensor([item["index"] for item in good], dtype=torch.long),
        "num_rows": len(items),
        "bad_rows": bad,
    }


@dataclass
class BadRowMonitor:
    """Counts skipped rows (over every process, under DDP) and stops training when there are too many.

    `update(batch)` adds a collated batch's `num_rows` and `bad_rows`, logs a warning with the
    running count (at most once per `warn_every_rows` rows, and at the first bad row), and raises
    `UserError` once more than `max_bad_fraction` of the rows seen were bad, after
    `min(min_rows_before_check, rows_per_epoch)` rows. `state_dict()` is plain ints (JSON-safe).
    """

    max_bad_fraction: float = 0.05
    min_rows_before_check: int = 200
    warn_every_rows: int = 10000
    image_root: str = ""
    rows_per_epoch: int | None = None
    rows_seen: int = 0
    bad_counts: dict[str, int] = field(default_factory=lambda: {reason: 0 for reason in BAD_ROW_REASONS})
    first_bad: dict[str, str] = field(default_factory=dict)
    _rows_at_last_warning: int | None = None

    @classmethod
    def from_settings(cls, settings: DataSettings, rows_per_epoch: int | None = None, image_root: str | None = None):
        """A monitor with the thresholds of `settings` (image root named in the error message)."""
        return cls(
            max_bad_fraction=settings.max_bad_fraction,
            min_rows_before_check=settings.min_rows_before_check,
            warn_every_rows=settings.warn_every_rows,
            image_root=image_root if image_root is not None else (settings.image_root or ""),
            rows_per_epoch=rows_per_epoch,
        )

    @property
    def rows_bad(self) -> int:
        """Bad rows seen so far (all reasons)."""
        return sum(self.bad_counts.values())

    def summary(self) -> str:
        """One line: 'B of N rows (P%) were skipped: ...'."""
        seen, bad = self.rows_seen, self.rows_bad
        parts = [f"{count} {BAD_ROW_REASONS[reason]}" for reason, count in self.bad_counts.items() if count]
        examples = [f"{reason}: {detail}" for reason, detail in self.first_bad.items()][:2]
        text = f"{bad} of {seen} rows ({100.0 * bad / max(seen, 1):.1f}%) were skipped"
        if parts:
            text += f": {', '.join(parts)}" + (f" (e.g. {'; '.join(examples)})" if examples else "")
        return text

    @staticmethod
    def batch_counts(batch: dict[str, Any]) -> list[int]:
        """A collated batch's `[rows, bad rows of each of BAD_ROW_REASONS]`."""
        reasons = Counter(row.reason for row in batch.get("bad_rows", []))
        return [int(batch["num_rows"])] + [reasons[reason] for reason in BAD_ROW_REASONS]

    def update(self, batch: dict[str, Any], totals: Sequence[int] | None = None) -> None:
        """Count one collated batch; warn now and then; raise `UserError` past the limit.

        Under DDP, `totals` (this micro-step's `batch_counts` summed over the processes) replace the
        batch's own counts, so every rank holds the same counts and stops at the same micro-step;
        the batch still gives the examples named in messages.
        """
        new_bad: list[BadRow] = list(batch.get("bad_rows", []))
        rows, *by_reason = self.batch_counts(batch) if totals is None else totals
        bad = dict(zip(BAD_ROW_REASONS, by_reason))
        self.rows_seen += rows
        for reason, count in bad.items():
            self.bad_counts[reason] = self.bad_counts.get(reason, 0) + count
        for row in new_bad:
            self.first_bad.setdefault(row.reason, row.detail)
        if not self.rows_bad:
            return
        minimum = self.min_rows_before_check
        if self.rows_per_epoch is not None:
            minimum = min(minimum, self.rows_per_epoch)
        if self.rows_seen >= minimum and self.rows_bad > self.max_bad_fraction * self.rows_seen:
            hints = []
            if self.bad_counts.get("missing_image") or self.bad_counts.get("unreadable_image"):
                hints.append(f"check --image_root ({self.image_root or 'the table folder'}) and the image files")
            if self.bad_counts.get("bad_caption"):
                hints.append("check --caption_column and the captions (a folder's .txt files: UTF-8 text)")
            raise UserError(
                f"{self.summary()}, more than --max_bad_fraction {self.max_bad_fraction:g}; {' and '.join(hints)}"
            )
        if any(bad.values()) and (
            self._rows_at_last_warning is None or self.rows_seen - self._rows_at_last_warning >= self.warn_every_rows
        ):
            self._rows_at_last_warning = self.rows_seen
            logger.warning("%s so far", self.summary())

    def state_dict(self) -> dict[str, Any]:
        """{'rows_seen': int, 'bad_counts': {reason: int}, 'first_bad': {reason: detail}} (JSON-safe)."""
        return {"rows_seen": self.rows_seen, "bad_counts": dict(self.bad_counts), "first_bad": dict(self.first_bad)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counts and examples saved by `state_dict()` (a checkpoint saved before the
        examples were kept has none)."""
        self.rows_seen = int(state["rows_seen"])
        self.bad_counts = {reason: 0 for reason in BAD_ROW_REASONS} | {k: int(v) for k, v in state["bad_counts"].items()}
        self.first_bad = {str(k): str(v) for k, v in state.get("first_bad", {}).items()}


# ------------------------------------------------------------------------------- sampler
class ResumableSampler(Sampler[int]):
    """Seeded, rank-sharded sampler that resumes mid-epoch exactly (fixes METHOD.md §7's restart).

    Epoch `e`'s global order is `torch.randperm(dataset_len)` drawn from a generator seeded by
    (seed, e) (or `arange` without shuffle); it is cut to a multiple of `num_replicas`
    (`drop_last`) or padded by wrapping around, and rank r takes the strided slice `order[r::N]`,
    so all ranks get `num_samples` indices and together cover the epoch. The state is
    (epoch, position): `position` rows of this rank's slice were consumed, as reported by the
    training loop through `advance(n)`. The sampler runs ahead of the loop (DataLoader
    prefetching), so it cannot count consumption itself. Iterating yields the slice from
    `position` on; `next_epoch()` starts the next epoch at position 0.
    """

    def __init__(
        self,
        dataset_len: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        if dataset_len <= 0:
            raise UserError("the dataset has no rows")
        if seed < 0:
            raise UserError(f"data seed must be non-negative, got {seed}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if drop_last and dataset_len < num_replicas:
            raise UserError(f"{dataset_len} rows cannot be split over {num_replicas} processes with drop_last")
        self.dataset_len = dataset_len
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0

    @property
    def num_samples(self) -> int:
        """Indices per rank per epoch (the same on every rank)."""
        if self.drop_last:
            return self.dataset_len // self.num_replicas
        return math.ceil(self.dataset_len / self.num_replicas)

    @property
    def epochs_consumed(self) -> float:
        """Passes over the data consumed so far: epoch + position / num_samples."""
        return self.epoch + self.position / self.num_samples

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ResumableSampler":
        """The sampler a `state_dict()` describes (its dataset size, seed and processes), at its position."""
        sampler = cls(state["dataset_len"], state["seed"], state["shuffle"], state["num_replicas"], 0, state["drop_last"])
        sampler.load_state_dict(state)
        return sampler

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's full index order for `epoch`: (num_samples,) int64."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(mixed_seed(self.seed, epoch))
            order = torch.randperm(self.dataset_len, generator=generator)
        else:
            order = torch.arange(self.dataset_len)
        total = self.num_samples * self.num_replicas
        if total <= self.dataset_len:
            order = order[:total]
        else:  # pad by wrapping around so every rank gets the same count
            order = torch.cat([order.repeat(total // self.dataset_len), order[: total % self.dataset_len]])
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order(self.epoch)
        return iter(order[self.position :].tolist())

    def __len__(self) -> int:
        """Indices left in the current epoch (what a fresh iteration yields)."""
        return self.num_samples - self.position

    def advance(self, num_rows: int) -> None:
        """Record that the training loop consumed `num_rows` more rows (bad ones included)."""
        self.position = min(self.position + int(num_rows), self.num_samples)

    def next_epoch(self) -> None:
        """Start the next epoch from its first index (call after the DataLoader is exhausted)."""
        self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first index (position 0)."""
        self.epoch = int(epoch)
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state: epoch, position and what the order depends on (checked on load)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dataset_len": self.dataset_len,
            "num_replicas": self.num_replicas,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` stopped; a different dataset, seed or shuffle is a `UserError`.

        The state is the same on every rank, so rank 0's copy can be loaded everywhere. With a
        different number of processes the rows consumed so far (position x old count) are
        carried over rounded down to whole rows per rank, so a few rows may be seen twice.
        """
        for key in ("dataset_len", "seed", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(
                    f"cannot resume the data order: the checkpoint has {key}={state[key]!r}, this run {getattr(self, key)!r}"
                )
        self.epoch = int(state["epoch"])
        position = int(state["position"])
        old_replicas = int(state.get("num_replicas", self.num_replicas))
        if old_replicas != self.num_replicas:
            position = position * old_replicas // self.num_replicas
            logger.warning(
                "resuming with %d processes instead of %d: the data order continues at row %d of each rank's share",
                self.num_replicas, old_replicas, position,
            )
        self.position = min(position, self.num_samples)


def make_dataloader(
    dataset: LongCaptionImageDataset,
    sampler: ResumableSampler,
    batch_size: int,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    split_caption: Callable[[str], list[str]] | None = None,
) -> DataLoader:
    """A DataLoader over `dataset` in `sampler`'s order whose batches come from `collate_examples`
    (with `split_caption`: each batch's caption segments too, made in the workers).

    Use it as is, without `accelerator.prepare` (see the module docstring). `drop_last` drops the
    epoch's last partial batch; the sampler's state stays exact either way (an epoch's dropped
    tail is never yielded again after resume). Workers are persistent when `num_workers > 0`.
    """
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    resolution = dataset.settings.resolution if hasattr(dataset, "settings") else 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=functools.partial(collate_examples, resolution=resolution, split_caption=split_caption),
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        worker_init_fn=ignore_stop_signals,
    )


# The signals that stop a training run with a checkpoint (`training.StopSignals`): Ctrl-C, a
# cluster or launcher ending the job (SIGTERM, also sent to the whole process group), its notice.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker leaves `STOP_SIGNALS` to the training process, which stops at the end of
    the optimizer step with a checkpoint; a worker they killed would end the run with a DataLoader
    error and no checkpoint. Workers still end with the training process (PyTorch's watchdog)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def closing_workers(loader: DataLoader) -> Iterator[DataLoader]:
    """`loader`'s persistent workers end when the block does, however it ends. They ignore
    `STOP_SIGNALS`, so workers left to interpreter exit (a traceback that keeps the loader's
    iterator, e.g. a worker's error re-raised there) would hang it: multiprocessing's exit
    handler SIGTERMs them and waits."""
    try:
        yield loader
    finally:
        workers = getattr(loader, "_iterator", None)  # torch keeps the persistent workers' iterator there
        if workers is not None:
            workers._shutdown_workers()  # torch's own shutdown; it is what the iterator's __del__ calls


# ------------------------------------------------------------------------------ test data
_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
}
_BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}
_SHAPES = ("circle", "square", "triangle")


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=colour)


def write_tiny_dataset(
    folder: str | os.PathLike,
    n: int = 8,
    resolution: int = 64,
    seed: int = 0,
    broken_image: bool = False,
    missing_image: bool = False,
) -> Path:
    """Write a small dataset for tests and return the path of its `train.jsonl`.

    `n` PNG images of one coloured shape on a plain background (alternately landscape and portrait,
    shorter side `resolution`) in `folder/images/`, and `folder/train.jsonl` with `path`
    (relative to `folder`) and a long multi-sentence caption: odd rows are short-ish, even rows
    have three blank-line-separated paragraphs and well over 77 CLIP tokens. `broken_image` adds
    a row whose PNG file holds garbage bytes; `missing_image` a row whose file does not exist
    (appended after the `n` good rows). Choices come from a torch generator seeded by `seed`.
    """
    from PIL import Image, ImageDraw

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    colours, backgrounds = list(_COLOURS), list(_BACKGROUNDS)
    rows = []
    for index in range(n):
        pick = torch.randint(0, 1_000_000, (4,), generator=generator).tolist()
        shape, colour = _SHAPES[pick[0] % len(_SHAPES)], colours[pick[1] % len(colours)]
        background = backgrounds[pick[2] % len(backgrounds)]
        size = (resolution * 5 // 4, resolution) if index % 2 == 0 else (resolution, resolution * 5 // 4)
        image = Image.new("RGB", size, _BACKGROUNDS[background])
        margin = resolution // 5 + pick[3] % max(resolution // 10, 1)
        box = (margin, margin, size[0] - margin, size[1] - margin)
        _draw_shape(ImageDraw.Draw(image), shape, box, _COLOURS[colour])
        name = f"images/{index:04d}_{colour}_{shape}.png"
        image.save(folder / name)
        caption = (
            f"A {colour} {shape} sits in the middle of a plain {background} background. "
            f"The {shape} is drawn with flat colour and sharp edges, and nothing else is in the picture."
        )
        if index % 2 == 0:
            caption += (
                f"\n\nThe {colour} {shape} fills most of the frame, leaving a thin margin of {background} on every "
                f"side. Its outline is crisp; there is no shadow, no texture and no gradient anywhere in the image. "
                f"The lighting is perfectly even, as if the picture were made by a computer rather than a camera."
                f"\n\nIn short, this is a simple synthetic image: one {shape}, one colour ({colour}), one "
                f"background ({background}). It is useful for testing because every detail of the picture is "
                f"named in this long caption, sentence by sentence, paragraph by paragraph, so that a model that "
                f"reads long prompts can be checked quickly on a small computer without downloading anything."
            )
        rows.append({"path": name, "caption": caption})
    if broken_image:
        (folder / "images" / "broken.png").write_bytes(b"this is not a png file\x00\x01\x02")
        rows.append({"path": "images/broken.png", "caption": "A broken file that no image library can open."})
    if missing_image:
        rows.append({"path": "images/does_not_exist.png", "caption": "A row whose image was never downloaded."})
    table = folder / "train.jsonl"
    table.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return table
