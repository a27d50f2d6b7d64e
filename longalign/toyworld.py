"""A toy long-prompt world that reproduces the paper's claims on a CPU (issue 7).

Images are 32x32, black, with 3-5 flat-coloured objects (circle / square / triangle x 6 saturated
colours) in distinct cells of a 3x3 grid. A caption states every object in its own sentence
("In the top left cell there is a red circle.") and mixes in neutral filler sentences (no colour,
cell or shape words) up to 150-220 tokens, so that about half of the object sentences start after
CLIP's 77-token window. An exact oracle reads an image back (per cell: present, nearest palette
colour, best-matching shape), so long-prompt following is measured without a learned judge:

- colour accuracy and colour+shape accuracy per stated object, split by where its sentence lies
  relative to the window: `before` (inside the first 75 content tokens), `straddles`, `after`;
- hallucination rate: unstated cells that hold an object.

`python -m longalign.toyworld make DIR` writes the data in the project's format
(`DIR/data/train.jsonl` + images, a held-out `eval.jsonl`) and every model folder the stages read,
in the real folder layouts: `DIR/sd15` (SD1.5 pipeline layout: tiny UNet, an AutoencoderKL with
scale factor 4 (32 px -> 8x8 latents), the toy CLIP text tower, the word tokenizer, SD1.5's
noise schedule with v-prediction), `DIR/t5`, `DIR/adapter`, `DIR/preference` (a CLIPModel
folder). The models are trained by `longalign.toyworld_models` (CLIP contrastively, the VAE to
near-lossless reconstruction); `--clip_steps 0 --vae_steps 0` writes random weights (tests).

Randomness comes only from seeded torch generators.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .loading import UserError, check_device, cli_entry

IMAGE_SIZE = 32
GRID = 3
CELL_ORIGINS = (1, 11, 21)  # top-left pixel of each 10x10 cell along one axis
CELL_SIZE = 10
SHAPE_SIZE = 8  # shapes fill an 8x8 box 1 px inside their cell
WINDOW_CONTENT_TOKENS = 75  # CLIP's 77-token window less <sot> and <eot>
MIN_OBJECTS, MAX_OBJECTS = 3, 5
CAPTION_TOKENS = (150, 220)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 200, 25),
    "blue": (30, 60, 240),
    "yellow": (240, 220, 20),
    "magenta": (220, 30, 220),
    "cyan": (20, 210, 220),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
CELLS = (
    "top left", "top middle", "top right",
    "middle left", "centre", "middle right",
    "bottom left", "bottom middle", "bottom right",
)  # fmt: skip
OBJECT_TEMPLATES = (
    "In the {cell} cell there is a {colour} {shape}.",
    "A {colour} {shape} sits in the {cell} cell.",
    "The {cell} cell holds a {colour} {shape}.",
    "There is a {colour} {shape} in the {cell} cell.",
)
FILLER_SENTENCES = (
    "The picture was made by a small program for a quick test.",
    "Nothing in this scene moves, and the light never changes.",
    "Every edge is sharp and clean, with no blur at all.",
    "There is no texture, no shadow and no gradient anywhere.",
    "The background is plain and empty between the objects.",
    "This image belongs to a synthetic collection of simple scenes.",
    "A careful reader will find every detail described in this text.",
    "The objects do not touch each other.",
    "Each object is drawn with a single flat fill.",
    "The scene is quiet, tidy and easy to read.",
    "No people, animals or plants appear here.",
    "The camera, if there were one, would be looking straight ahead.",
    "It is a good example for checking whether a model reads long prompts.",
    "The layout follows a simple and regular plan.",
    "Some places are empty, and that is on purpose.",
    "The lighting is even, as if a computer made it.",
    "There is no writing of any kind in the image.",
    "All the objects are about the same size.",
    "The scene was generated from a random seed.",
    "Nothing here is hidden behind anything else.",
    "The style is flat and minimal, like an icon.",
    "A viewer would describe it as calm and orderly.",
    "The image is small, only a few pixels across.",
    "This sentence says nothing about the objects themselves.",
    "The whole arrangement could be redrawn in a second.",
    "There are no reflections, outlines or borders.",
    "It was saved without any compression artefacts.",
    "Looking at it for a long time reveals nothing new.",
)
SPECIAL_TOKENS = ("<sot>", "<eot>")
UNK_TOKEN = "<unk>"
_WORD = re.compile(r"\w+|[^\w\s]+")  # the tokenizer's pre-tokenizer (tokenizers' `Whitespace`)
POSITIONS = ("before", "straddles", "after")


# ------------------------------------------------------------------------------ the world
@dataclass(frozen=True)
class ToyObject:
    """One object: grid cell index 0..8 (row-major), palette colour name, shape name."""

    cell: int
    colour: str
    shape: str


@dataclass
class ToyScene:
    """A scene and its caption: objects, the caption, and each object's sentence as a character
    span (start, end) of the caption, in the order of `objects`."""

    objects: list[ToyObject]
    caption: str
    sentence_spans: list[tuple[int, int]]

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "caption": self.caption, "sentence_spans": self.sentence_spans}

    @classmethod
    def from_dict(cls, data: dict) -> "ToyScene":
        return cls([ToyObject(**o) for o in data["objects"]], data["caption"], [tuple(s) for s in data["sentence_spans"]])

    def cells(self) -> set[int]:
        return {o.cell for o in self.objects}


def word_count(text: str) -> int:
    """Content tokens of `text` under the toy word tokenizer (same regex as its pre-tokenizer)."""
    return len(_WORD.findall(text))


def _pick(generator: torch.Generator, n: int) -> int:
    return int(torch.randint(0, n, (1,), generator=generator))


def object_sentence(obj: ToyObject, template: int = 0) -> str:
    """The sentence stating `obj` with template `template` (index into `OBJECT_TEMPLATES`)."""
    return OBJECT_TEMPLATES[template].format(cell=CELLS[obj.cell], colour=obj.colour, shape=obj.shape)


def sample_scene(generator: torch.Generator, caption_tokens: tuple[int, int] = CAPTION_TOKENS) -> ToyScene:
    """Draw one scene and its long caption from `generator`.

    3-5 objects in distinct cells, each with a random colour, shape and sentence template; filler
    sentences (drawn with replacement) are added until the caption holds a target number of
    content tokens drawn uniformly so that the total stays within `caption_tokens`; then all
    sentences are shuffled, so object sentences land anywhere (about half start after token 77).
    """
    n_objects = MIN_OBJECTS + _pick(generator, MAX_OBJECTS - MIN_OBJECTS + 1)
    cells = torch.randperm(GRID * GRID, generator=generator)[:n_objects].tolist()
    objects = [ToyObject(cell, COLOURS[_pick(generator, len(COLOURS))], SHAPES[_pick(generator, len(SHAPES))]) for cell in cells]
    sentences = [(object_sentence(o, _pick(generator, len(OBJECT_TEMPLATES))), index) for index, o in enumerate(objects)]
    longest_filler = max(word_count(s) for s in FILLER_SENTENCES)
    low, high = caption_tokens
    target = low + _pick(generator, max(high - longest_filler - low, 1))
    total = sum(word_count(s) for s, _ in sentences)
    while total < target:
        filler = FILLER_SENTENCES[_pick(generator, len(FILLER_SENTENCES))]
        sentences.append((filler, None))
        total += word_count(filler)
    order = torch.randperm(len(sentences), generator=generator).tolist()
    caption, spans = "", [None] * n_objects
    for position in order:
        text, owner = sentences[position]
        start = len(caption) + (1 if caption else 0)
        caption = f"{caption} {text}" if caption else text
        if owner is not None:
            spans[owner] = (start, start + len(text))
    return ToyScene(objects, caption, spans)


def sample_scenes(n: int, seed: int) -> list[ToyScene]:
    """`n` scenes from a torch generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [sample_scene(generator) for _ in range(n)]


def shape_masks() -> dict[str, torch.Tensor]:
    """The 8x8 boolean masks of the three shapes: a disc, a centred 6x6 square, an upward triangle."""
    coords = torch.arange(SHAPE_SIZE, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    centre = SHAPE_SIZE / 2
    circle = (x - centre) ** 2 + (y - centre) ** 2 <= (SHAPE_SIZE / 2) ** 2
    square = torch.zeros(SHAPE_SIZE, SHAPE_SIZE, dtype=torch.bool)
    square[1:-1, 1:-1] = True
    triangle = (x - centre).abs() <= y / 2 + 0.01  # apex at the top, base the bottom row
    return {"circle": circle, "square": square, "triangle": triangle}


def cell_box(cell: int) -> tuple[int, int]:
    """Top-left pixel (row, col) of the 10x10 region of grid cell `cell` (row-major 0..8)."""
    return CELL_ORIGINS[cell // GRID], CELL_ORIGINS[cell % GRID]


def render(scene: ToyScene | Sequence[ToyObject]) -> torch.Tensor:
    """Draw a scene: (3, 32, 32) float in [0, 1], black background, each shape in its cell."""
    objects = getattr(scene, "objects", scene)  # a ToyScene or a list of ToyObject
    image = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)
    masks = shape_masks()
    for obj in objects:
        top, left = cell_box(obj.cell)
        colour = torch.tensor(PALETTE[obj.colour], dtype=torch.float32) / 255.0
        region = image[:, top + 1 : top + 1 + SHAPE_SIZE, left + 1 : left + 1 + SHAPE_SIZE]
        mask = masks[obj.shape]
        region[:, mask] = colour[:, None]
    return image


def to_pil(image: torch.Tensor):
    """(3, H, W) float in [0, 1] -> PIL RGB image (rounded to 8 bits)."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")


def from_pil(image) -> torch.Tensor:
    """PIL image -> (3, H, W) float in [0, 1]."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------ the oracle
@dataclass
class CellReading:
    """What the oracle sees in one cell: object present, nearest palette colour, best shape."""

    present: bool
    colour: str | None
    shape: str | None


PRESENT_THRESHOLD = 0.35  # a pixel is "on" when its brightest channel exceeds this
MIN_ON_PIXELS = 8  # a cell holds an object when at least this many pixels are on


def _shifted_templates() -> dict[str, torch.Tensor]:
    """Shape masks placed in the 10x10 cell at offsets (dy, dx) in {0, 1, 2}^2: (9, 10, 10) each."""
    out = {}
    for name, mask in shape_masks().items():
        placed = torch.zeros(9, CELL_SIZE, CELL_SIZE, dtype=torch.bool)
        for k, (dy, dx) in enumerate((a, b) for a in range(3) for b in range(3)):
            placed[k, dy : dy + SHAPE_SIZE, dx : dx + SHAPE_SIZE] = mask
        out[name] = placed
    return out


def read_image(image: torch.Tensor) -> list[CellReading]:
    """The oracle (exact on rendered images): per cell (row-major), whether an object is present
    (>= 8 pixels whose brightest channel > 0.35), its colour (palette colour nearest to the mean of
    those pixels) and its shape (template with the best IoU over 1-px shifts). (3, 32, 32) in [0, 1]."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    image = image.float().clamp(0, 1)
    palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32) / 255.0  # (6, 3)
    templates = _shifted_templates()
    readings = []
    for cell in range(GRID * GRID):
        top, left = cell_box(cell)
        region = image[:, top : top + CELL_SIZE, left : left + CELL_SIZE]  # (3, 10, 10)
        on = region.amax(dim=0) > PRESENT_THRESHOLD  # (10, 10)
        if int(on.sum()) < MIN_ON_PIXELS:
            readings.append(CellReading(False, None, None))
            continue
        mean = region[:, on].mean(dim=1)  # (3,)
        colour = COLOURS[int(((palette - mean) ** 2).sum(dim=1).argmin())]
        best, shape = -1.0, None
        for name, placed in templates.items():
            inter = (placed & on).flatten(1).sum(1).float()
            union = (placed | on).flatten(1).sum(1).float()
            iou = float((inter / union).max())
            if iou > best:
                best, shape = iou, name
        readings.append(CellReading(True, colour, shape))
    return readings


# ------------------------------------------------------------------------------ token spans
def sentence_positions(scene: ToyScene, tokenizer, window: int = WINDOW_CONTENT_TOKENS) -> list[tuple[int, int, str]]:
    """Per object: (first, last) content-token index of its sentence in the whole caption, from the
    tokenizer's offsets, and where it lies relative to the first `window` content tokens (what a
    77-token CLIP keeps): `before` (last < window), `after` (first >= window) or `straddles`."""
    encoded = tokenizer(scene.caption, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    out = []
    for start, end in scene.sentence_spans:
        inside = [k for k, (a, b) in enumerate(offsets) if a >= start and b <= end and b > a]
        if not inside:
            raise ValueError(f"sentence at characters {start}..{end} has no tokens")
        first, last = inside[0], inside[-1]
        where = "before" if last < window else "after" if first >= window else "straddles"
        out.append((first, last, where))
    return out


# ------------------------------------------------------------------------------ metrics
def score_images(images: torch.Tensor | Sequence[torch.Tensor], scenes: Sequence[ToyScene], tokenizer) -> dict:
    """Oracle metrics of generated images against their scenes (issue 7).

    `images` (N, 3, 32, 32) in [0, 1]. Returns a dict with, for `all` stated objects and per
    position (`before` / `straddles` / `after` the 77-token window): `objects` (count), `present`,
    `colour` (colour accuracy) and `colour_shape` (colour and shape both right) as fractions, plus
    `hallucination` (share of unstated cells that hold an object) and `unstated_cells`.
    """
    counts = {key: {"objects": 0, "present": 0, "colour": 0, "colour_shape": 0} for key in ("all", *POSITIONS)}
    hallucinated = unstated = 0
    for image, scene in zip(images, scenes):
        readings = read_image(image)
        for obj, (_, _, where) in zip(scene.objects, sentence_positions(scene, tokenizer)):
            reading = readings[obj.cell]
            colour_ok = reading.present and reading.colour == obj.colour
            for key in ("all", where):
                counts[key]["objects"] += 1
                counts[key]["present"] += int(reading.present)
                counts[key]["colour"] += int(colour_ok)
                counts[key]["colour_shape"] += int(colour_ok and reading.shape == obj.shape)
        for cell in set(range(GRID * GRID)) - scene.cells():
            unstated += 1
            hallucinated += int(readings[cell].present)
    result: dict = {}
    for key, c in counts.items():
        n = c["objects"]
        result[key] = {"objects": n, **{m: (c[m] / n if n else float("nan")) for m in ("present", "colour", "colour_shape")}}
    result["hallucination"] = hallucinated / unstated if unstated else float("nan")
    result["unstated_cells"] = unstated
    return result


# ------------------------------------------------------------------------------ tokenizer
def vocabulary() -> list[str]:
    """Every word of the world (templates, fillers, cells, colours, shapes), lower-cased, sorted."""
    words = set()
    texts = [*FILLER_SENTENCES, *OBJECT_TEMPLATES, *CELLS, *COLOURS, *SHAPES]
    for text in texts:
        words.update(w.lower() for w in _WORD.findall(re.sub(r"\{\w+\}", " ", text)))
    return sorted(words)


def build_tokenizer(model_max_length: int = 77):
    """The toy word-level tokenizer as a transformers `PreTrainedTokenizerFast`.

    Built with the `tokenizers` library: lower-casing, `Whitespace` pre-tokenizer (words and
    punctuation runs), a `WordLevel` model over `vocabulary()` (id 0 = `<unk>`), and the template
    `<sot> $A <eot>`; `<sot>` and `<eot>` are the last two ids (as in CLIP, so CLIP's pooling at the
    first `<eot>` works) and `<eot>` is also the pad token. `tokenizer("")` gives `[<sot>, <eot>]`.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = [UNK_TOKEN, *vocabulary(), *SPECIAL_TOKENS]
    vocab = {token: index for index, token in enumerate(tokens)}
    sot, eot = vocab["<sot>"], vocab["<eot>"]
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<sot> $A <eot>", pair="<sot> $A <eot> $B <eot>", special_tokens=[("<sot>", sot), ("<eot>", eot)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<sot>",
        eos_token="<eot>",
        pad_token="<eot>",
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
    )


# ------------------------------------------------------------------------------ dataset files
def write_split(folder: Path, name: str, scenes: Sequence[ToyScene]) -> Path:
    """Write `folder/NAME.jsonl` (`path`, `caption`, the project's data format), the PNGs under
    `folder/NAME/`, `folder/NAME_scenes.jsonl` (the facts, for the oracle) and `folder/NAME_prompts.txt`
    (one caption per line, for sample.py / analyze_preference). Returns the jsonl path."""
    (folder / name).mkdir(parents=True, exist_ok=True)
    rows, facts = [], []
    for index, scene in enumerate(scenes):
        path = f"{name}/{index:06d}.png"
        to_pil(render(scene)).save(folder / path)
        rows.append(json.dumps({"path": path, "caption": scene.caption}))
        facts.append(json.dumps(scene.to_dict()))
    table = folder / f"{name}.jsonl"
    table.write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / f"{name}_scenes.jsonl").write_text("\n".join(facts) + "\n", encoding="utf-8")
    (folder / f"{name}_prompts.txt").write_text("\n".join(s.caption for s in scenes) + "\n", encoding="utf-8")
    return table


def read_scenes(path: str | os.PathLike) -> list[ToyScene]:
    """Read a `*_scenes.jsonl` written by `write_split`; a missing file is a `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"toy scenes file not found: '{path}' (write one with python -m longalign.toyworld make DIR)")
    return [ToyScene.from_dict(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------ make
@dataclass
class MakeConfig:
    """Options of `python -m longalign.toyworld make DIR` (issue 7)."""

    n: int = field(default=4096, metadata={"help": "training scenes"})
    n_eval: int = field(default=256, metadata={"help": "held-out evaluation scenes"})
    seed: int = field(default=0, metadata={"help": "seed of the scenes (eval uses seed + 1) and of the model initialisations"})
    clip_steps: int = field(default=1500, metadata={"help": "contrastive training steps of the toy CLIP (0: random weights)"})
    vae_steps: int = field(default=1500, metadata={"help": "reconstruction training steps of the toy VAE (0: random weights)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads while training (0: leave torch's default)"})
    device: str = field(default="cpu", metadata={"help": "device the toy CLIP and VAE train on (cpu, cuda)"})

    def __post_init__(self) -> None:
        for name in ("n", "n_eval"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("clip_steps", "vae_steps", "threads"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0 (got {getattr(self, name)})")
        check_device(self.device)  # before the data is written, not after


def make(root: str | os.PathLike, config: MakeConfig | None = None, log=print) -> dict[str, Path]:
    """Write the toy world under `root`: `data/` (train/eval splits) and the model folders
    `sd15`, `t5`, `adapter`, `preference` in the real layouts. Returns {name: path}, with
    `train` and `eval` the two jsonl tables."""
    from . import toyworld_models as models

    config = config or MakeConfig()
    root = Path(root)
    data = root / "data"
    train_scenes = sample_scenes(config.n, config.seed)
    eval_scenes = sample_scenes(config.n_eval, config.seed + 1)
    paths = {"train": write_split(data, "train", train_scenes), "eval": write_split(data, "eval", eval_scenes)}
    tokenizer = build_tokenizer()
    paths.update(models.write_model_folders(root, tokenizer, train_scenes, config, log=log))
    (root / "toyworld.json").write_text(json.dumps({"make": asdict(config), **{k: str(v) for k, v in paths.items()}}, indent=2))
    return paths


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """`python -m longalign.toyworld make DIR [--n N --seed S ...]` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m longalign.toyworld", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make_parser = commands.add_parser("make", help="write the toy dataset and model folders")
    make_parser.add_argument("dir", help="output folder")
    for name, spec in MakeConfig.__dataclass_fields__.items():
        make_parser.add_argument(f"--{name}", type=type(spec.default), default=spec.default, help=spec.metadata["help"])
    args = parser.parse_args(argv)
    config = MakeConfig(**{name: getattr(args, name) for name in MakeConfig.__dataclass_fields__})
    if config.threads:
        torch.set_num_threads(config.threads)
    for name, path in make(args.dir, config).items():
        print(f"{name:>10}: {path}")


if __name__ == "__main__":
    main()
