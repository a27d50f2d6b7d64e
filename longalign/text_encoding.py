"""Segment-level long-prompt encoding (paper §3; METHOD.md §1-2).

A long prompt is split into segments (sentences) that each fit CLIP's 77-token window; every
segment is encoded by CLIP in one batched forward pass; per segment the `<sot>` row and the
content rows are kept (`<eot>` and padding dropped); the rows of all segments are concatenated and
fitted to `token_length` with a new padding embedding `<pad*>`. T5-large encodes the whole prompt
and the `TextAdapter` maps it to the UNet width. The UNet context is
`cat([clip (B, L, 768), adapter(t5) (B, L, 768)], dim=1)` -> (B, 2L, 768), L = `token_length`.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol, Sequence

import pysbd
import torch
from torch import nn

from .adapter import TextAdapter
from .loading import UserError, load_pretrained

logger = logging.getLogger(__name__)

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
T5_LARGE = "google-t5/t5-large"
ENCODER_MODES = ("clip+t5", "clip", "t5")

# Released rule for <pad*>: the mean of CLIP's outputs for "" over the last 60 positions of the
# window, all padding (positions 17..76 of SD1.5's 77).
PAD_EMBEDDING_POSITIONS = 60


class Segmenter(Protocol):
    """A rule that splits a prompt into CLIP segments (`SEGMENTERS`, chosen by `--segmenter`).

    Called as `segmenter(prompt, tokenizer=tokenizer)` -> one or more str (`[""]` for the empty
    prompt), in order. The same rule splits for SD1.5's CLIP tokenizer (the UNet context) and for
    a preference model's (its segment-mode score), so it may use only this slice of the
    transformers tokenizer interface, which open_clip scorers offer too
    (`reward._OpenCLIPSegmentTokenizer`): `tokenizer(texts, add_special_tokens=False)["input_ids"]`,
    `tokenizer.decode(ids)`, `tokenizer.model_max_length` and `len(tokenizer)`. Content beyond the
    window (`content_window`) is cut by the encoder, so a segmenter should keep segments within it.
    """

    def __call__(self, prompt: str, tokenizer: Any) -> list[str]: ...


LEGACY_PATTERN = re.compile(r'"!|\.|\?|;"')  # the released regex, quotes and all


# --------------------------------------------------------------------------------- segmenters
def paragraphs(text: str) -> list[str]:
    """The text's paragraphs (split at blank lines), each with its whitespace runs collapsed to one
    space; blank paragraphs are left out."""
    collapsed = (" ".join(paragraph.split()) for paragraph in re.split(r"\n\s*\n", text))
    return [paragraph for paragraph in collapsed if paragraph]


def split_legacy(prompt: str, tokenizer: object = None) -> list[str]:
    """The released splitting rule, for exact parity with the released LongSD weights.

    Splits with the released pattern `"!|\\.|\\?|;"`: on `.` and `?`, and on the literal pairs `"!`
    and `;"` (the regex meant `!` and `;` but its quotes sit inside it). Every non-empty piece,
    whitespace-only ones included, gets a `.` appended and is stripped (whitespace never changes
    CLIP's tokens); a prompt with no non-empty piece (``""``, ``"..."``) is its own one segment.
    Decimals (`3.5`) are split, and a segment longer than CLIP's window is later truncated by the
    tokenizer, as released.
    """
    pieces = [piece for piece in LEGACY_PATTERN.split(prompt) if piece]
    return [(piece + ".").strip() for piece in pieces] or [prompt]


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _greedy_pack(pieces: list[str], joiner: str, fits: Callable[[str], bool]) -> list[str]:
    """Join consecutive pieces while the result fits; a piece that does not fit alone stays alone."""
    packed: list[str] = []
    current = ""
    for piece in pieces:
        candidate = f"{current}{joiner}{piece}" if current else piece
        if not current or fits(candidate):
            current = candidate
        else:
            packed.append(current)
            current = piece
    if current:
        packed.append(current)
    return packed


def fit_to_window(sentence: str, tokenizer, max_tokens: int) -> list[str]:
    """Split one sentence into pieces of at most `max_tokens` content tokens, never dropping text.

    Tries comma boundaries first, then word boundaries, then (for a single enormous "word")
    character boundaries. Pieces are packed greedily, so a sentence is split as little as possible.
    """

    def fits(text: str) -> bool:
        return _token_count(tokenizer, text) <= max_tokens

    if fits(sentence):
        return [sentence]
    levels = [(r"(?<=,)\s+", " "), (r"\s+", " "), (None, "")]
    for level, (pattern, joiner) in enumerate(levels):
        parts = re.split(pattern, sentence) if pattern else list(sentence)
        if len(parts) > 1:
            break
    pieces = []
    for chunk in _greedy_pack(parts, joiner, fits):
        pieces.extend([chunk] if fits(chunk) else fit_to_window(chunk, tokenizer, max_tokens))
    return pieces


def split_sentences(prompt: str, tokenizer, max_tokens: int | None = None) -> list[str]:
    """Default segmenter: one sentence per segment, each fitting CLIP's content window (75 tokens).

    Paragraphs (blank lines) are split first; pySBD finds sentence boundaries (abbreviations such
    as "Dr." and "e.g.", decimals such as "3.5 m", `!`, `?`); `;` also ends a segment. A sentence
    longer than the window is split at a comma, else at a word boundary (`fit_to_window`).
    Empty or whitespace-only prompts give one empty segment.
    """
    if max_tokens is None:
        max_tokens = content_window(tokenizer)
    segmenter = pysbd.Segmenter(language="en", clean=False)
    sentences: list[str] = []
    for paragraph in paragraphs(prompt):
        for sentence in segmenter.segment(paragraph):
            sentences.extend(clause for clause in re.split(r"(?<=;)\s+", sentence.strip()) if clause)
    segments = [piece for sentence in sentences for piece in fit_to_window(sentence, tokenizer, max_tokens)]
    return segments or [""]


SEGMENTERS: dict[str, Segmenter] = {"sentences": split_sentences, "legacy": split_legacy}


def get_segmenter(name: str) -> Segmenter:
    """Look up a segmenter by name; unknown names raise a `UserError` listing the choices."""
    if name not in SEGMENTERS:
        raise UserError(f"unknown segmenter '{name}'; choose one of: {', '.join(SEGMENTERS)}")
    return SEGMENTERS[name]


def context_window(tokenizer, text_encoder: nn.Module | None = None) -> int:
    """Tokens one CLIP forward sees: 77 for SD1.5 (`<sot>` + 75 content + `<eot>`)."""
    window = int(tokenizer.model_max_length)
    if text_encoder is not None:
        window = min(window, int(text_encoder.config.max_position_embeddings))
    return window


def content_window(tokenizer) -> int:
    """Content tokens that fit one segment: the window less `<sot>` and `<eot>` (75 for CLIP)."""
    return context_window(tokenizer) - 2


# ------------------------------------------------------------------------------ the report
@dataclass
class PromptReport:
    """What happened to one prompt: segments, CLIP content tokens, what was kept and dropped.

    `cut_segment` is the 0-based index of the segment the `token_length` cut fell in (None: no
    cut), and `cut_text` its first 60 characters; the warning counts segments from 1.
    """

    segments: int
    content_tokens: int
    tokens_kept: int
    tokens_dropped: int
    cut_segment: int | None = None
    cut_text: str | None = None
    t5_tokens: int | None = None
    t5_tokens_dropped: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


MAX_TOKEN_LENGTH = 1024  # rows per branch; the paper uses 240, and the UNet's attention grows with it


def checked_token_length(token_length: int) -> int:
    """`token_length` if it is in [1, MAX_TOKEN_LENGTH] (rows per branch of the UNet context), else a `UserError`."""
    if not 1 <= token_length <= MAX_TOKEN_LENGTH:
        raise UserError(f"--token_length must be in [1, {MAX_TOKEN_LENGTH}] (got {token_length})")
    return token_length


def check_encoder_mode(mode: str) -> None:
    """A `UserError` naming the choices unless `mode` is one of `ENCODER_MODES`."""
    if mode not in ENCODER_MODES:
        raise UserError(f"unknown encoder mode '{mode}'; choose one of: {', '.join(ENCODER_MODES)}")


def check_tokenizer(tokenizer, where: str) -> None:
    """Refuse a tokenizer that loaded without its vocabulary (some classes load empty silently)."""
    if len(tokenizer) < 10:
        raise UserError(f"tokenizer at '{where}' loaded with {len(tokenizer)} tokens; the folder is incomplete")


# ------------------------------------------------------------------------------ CLIP branch
class SegmentCLIPEncoder(nn.Module):
    """Segment-level CLIP encoding with the released token policy (paper §3.1, METHOD.md §1).

    `forward(prompts)` -> (hidden (B, token_length, D), reports). Per prompt: segments are
    tokenized as `<sot> content[:75] <eot>`, the batch's segments with rows to keep go through CLIP
    in one forward pass (those past the cut are skipped, so an enormous prompt costs no more than
    `token_length` rows), each segment keeps its `<sot>` and content rows (padding is decided by length,
    never by id), the rows are concatenated in order and cut at, or padded with `<pad*>` to,
    `token_length`. `<pad*>` (buffer `pad_embedding`, (D,)) is computed once from the empty prompt.
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, token_length: int = 240, segmenter: str = "sentences"):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.token_length = checked_token_length(token_length)
        self.segmenter = get_segmenter(segmenter)
        self.window = context_window(tokenizer, text_encoder)
        if self.window < PAD_EMBEDDING_POSITIONS + 2:  # <sot> <eot> and the padding <pad*> averages
            raise UserError(f"CLIP's window is {self.window} tokens; <pad*> needs <sot>, <eot> and {PAD_EMBEDDING_POSITIONS} padding positions")
        specials = tokenizer("", add_special_tokens=True)["input_ids"]
        if len(specials) != 2:
            raise UserError(f"tokenizer must wrap text as <sot> text <eot>; it gives {specials} for ''")
        self.sot_id, self.eot_id = specials
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_id
        self.register_buffer("pad_embedding", self._empty_prompt_padding(), persistent=False)
        self.truncation_warnings = TruncationWarnings()

    @torch.no_grad()
    def _empty_prompt_padding(self) -> torch.Tensor:
        input_ids = [self.sot_id, self.eot_id] + [self.pad_id] * (self.window - 2)
        device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(torch.tensor([input_ids], device=device)).last_hidden_state
        return hidden[0, -PAD_EMBEDDING_POSITIONS:].mean(dim=0)  # (D,)

    def split(self, prompt: str) -> list[str]:
        """The prompt's segments under this encoder's segmenter."""
        return self.segmenter(prompt, tokenizer=self.tokenizer)

    def splitter(self) -> Callable[[str], list[str]]:
        """`split` as a picklable function without the CLIP model, for DataLoader workers: the
        training loop splits each batch's captions there, off the training step (`sentences` costs
        about 3 ms per long caption on a CPU core), and passes the result to `forward` as `segments`."""
        return functools.partial(self.segmenter, tokenizer=self.tokenizer)

    def tokenize_segments(self, segments: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Token ids `<sot> content[:75] <eot>` per segment, and the untruncated content counts."""
        content_ids = self.tokenizer(list(segments), add_special_tokens=False, verbose=False)["input_ids"]
        max_content = self.window - 2
        sequences = [[self.sot_id, *ids[:max_content], self.eot_id] for ids in content_ids]
        return sequences, [len(ids) for ids in content_ids]

    def encode_sequences(self, sequences: Sequence[list[int]]) -> torch.Tensor:
        """One CLIP pass over token sequences, padded to the longest (T): hidden (S, T, D)."""
        longest = max(len(sequence) for sequence in sequences)
        input_ids = torch.tensor([s + [self.pad_id] * (longest - len(s)) for s in sequences])
        return self.text_encoder(input_ids.to(self.pad_embedding.device)).last_hidden_state

    def forward(
        self, prompts: Sequence[str], segments: Sequence[list[str] | None] | None = None
    ) -> tuple[torch.Tensor, list[PromptReport]]:
        """Prompts (B) -> CLIP branch (B, token_length, D) and a report per prompt (METHOD.md §1).

        Each segment is encoded alone as `<sot> content <eot>`; its rows kept in the context are
        `<sot>` + content (`len(sequence) - 1`: the `<eot>` row is dropped, every segment's `<sot>`
        kept), concatenated in order up to `token_length` and padded with `<pad*>`. All segments
        of the batch that reach the context go through CLIP as one batch; those past the cut skip it.
        `segments` (B): each prompt's `split` made earlier (by `splitter`), or None to split it here.
        """
        given = segments if segments is not None else [None] * len(prompts)
        if len(given) != len(prompts):
            raise ValueError(f"{len(given)} segment lists for {len(prompts)} prompts")
        if any(split is not None and not split for split in given):
            raise ValueError("a prompt's segment list is empty; the empty prompt splits into ['']")
        segments_per_prompt = [self.split(prompt) if split is None else split for prompt, split in zip(prompts, given)]
        flat = [segment for segments in segments_per_prompt for segment in segments]
        sequences, content_counts = self.tokenize_segments(flat)
        takes, index = [], 0  # rows each segment gives its prompt: `<sot>` + content, up to token_length
        for segments in segments_per_prompt:
            length = 0
            for sequence in sequences[index : index + len(segments)]:
                takes.append(max(min(len(sequence) - 1, self.token_length - length), 0))
                length += takes[-1]
            index += len(segments)
        needed = [i for i, take in enumerate(takes) if take > 0]  # segments past the cut skip CLIP
        hidden = dict(zip(needed, self.encode_sequences([sequences[i] for i in needed])))  # i -> (T, D)
        outputs, reports = [], []
        index = 0
        for prompt_index, segments in enumerate(segments_per_prompt):
            rows, kept_tokens, cut_segment = [], 0, None
            for offset in range(len(segments)):
                take = takes[index + offset]
                if take > 0:
                    rows.append(hidden[index + offset][:take])
                    kept_tokens += take - 1
                if take < len(sequences[index + offset]) - 1 and cut_segment is None:
                    cut_segment = offset
            length = sum(takes[index : index + len(segments)])
            content = sum(content_counts[index : index + len(segments)])
            index += len(segments)
            context = torch.cat(rows, dim=0)  # (<= token_length, D)
            if length < self.token_length:
                padding = self.pad_embedding.to(context.dtype).expand(self.token_length - length, -1)
                context = torch.cat([context, padding], dim=0)
            outputs.append(context)
            report = PromptReport(len(segments), content, kept_tokens, content - kept_tokens)
            if report.tokens_dropped:
                report.cut_segment = cut_segment
                report.cut_text = segments[cut_segment][:60] if cut_segment is not None else None
                self._warn_cut(prompts[prompt_index], report, segments)
            reports.append(report)
        return torch.stack(outputs), reports  # (B, token_length, D)

    def _warn_cut(self, prompt: str, report: PromptReport, segments: list[str]) -> None:
        where = (
            f"segment {report.cut_segment + 1}/{len(segments)} ('{report.cut_text}...')"
            if report.cut_segment is not None
            else "over-long segments (each cut at CLIP's window)"
        )
        self.truncation_warnings.warn(
            "prompt %s: %d of %d CLIP content tokens dropped (token_length=%d); the cut fell in %s",
            prompt_label(prompt), report.tokens_dropped, report.content_tokens, self.token_length, where,
        )


class TruncationWarnings:
    """The warnings for prompts cut at `token_length`: all of them (`limit` None, as in sample.py), or
    the first `limit`, then one line saying the rest are not shown (training: a long-caption dataset
    would log one per caption per step). Shared by an encoder's CLIP and T5 branches."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.count = 0

    def warn(self, message: str, *args: object) -> None:
        if self.limit is None or self.count < self.limit:
            logger.warning(message, *args)
        elif self.count == self.limit and self.limit > 0:
            logger.warning("more prompts are cut at token_length; their warnings are not shown")
        self.count += 1


def prompt_label(prompt: str) -> str:
    """A prompt's opening words, quoted, to name it in a warning (an index would be the one within
    its batch, not within the user's prompt file)."""
    text = " ".join(prompt.split())
    return repr(text if len(text) <= 40 else text[:40] + "...")


# -------------------------------------------------------------------------------- T5 branch
class T5PromptEncoder(nn.Module):
    """T5-large encoder on the whole prompt (paper §3.1, METHOD.md §2).

    `forward(prompts)` -> (hidden (B, token_length, 1024), [(tokens, dropped)] per prompt).
    Prompts are padded/truncated to `token_length`; as released, the encoder sees no attention
    mask (pad tokens are encoded) unless `use_attention_mask`.
    """

    def __init__(self, tokenizer, encoder: nn.Module, token_length: int = 240, use_attention_mask: bool = False):
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.token_length = checked_token_length(token_length)
        self.use_attention_mask = use_attention_mask
        self.truncation_warnings = TruncationWarnings()

    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Prompts (B) -> T5 hidden states (B, token_length, 1024 for T5-large) and, per prompt,
        (tokens with `</s>`, tokens cut): the whole prompt padded (or cut) to `token_length`, without
        an attention mask unless `use_attention_mask` (METHOD.md §2: as the released models were trained)."""
        counts = [len(ids) for ids in self.tokenizer(list(prompts), verbose=False)["input_ids"]]
        batch = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.token_length, truncation=True, return_tensors="pt"
        )
        device = next(self.encoder.parameters()).device
        mask = batch["attention_mask"].to(device) if self.use_attention_mask else None
        hidden = self.encoder(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
        for prompt, count in zip(prompts, counts):
            if count > self.token_length:
                self.truncation_warnings.warn(
                    "prompt %s: T5 sees the first %d of %d tokens (token_length=%d); %d dropped",
                    prompt_label(prompt), self.token_length, count, self.token_length, count - self.token_length,
                )
        return hidden, [(n, max(n - self.token_length, 0)) for n in counts]


# ------------------------------------------------------------------------------- composite
@dataclass
class FrozenEncoding:
    """Outputs of the frozen encoders for a batch: CLIP (B, L, D) and/or T5 (B, L, 1024)."""

    clip: torch.Tensor | None
    t5: torch.Tensor | None
    reports: list[PromptReport]


class LongPromptEncoder(nn.Module):
    """Long prompt -> UNet context, in the paper's three encoder variants (§3.1, ablation §5).

    `mode` = `clip+t5` (default): `cat([clip (B, L, D), adapter(t5) (B, L, D)], 1)` -> (B, 2L, D);
    `clip`: (B, L, D); `t5`: `adapter(t5)` (B, L, D). CLIP and T5 are frozen (`encode_frozen`
    runs under no_grad); the adapter is applied in `context`, so it can be trained.
    """

    def __init__(
        self,
        clip: SegmentCLIPEncoder | None,
        t5: T5PromptEncoder | None,
        adapter: TextAdapter | None,
        mode: str = "clip+t5",
    ):
        super().__init__()
        check_encoder_mode(mode)
        needs_t5 = mode != "clip"
        if (mode != "t5" and clip is None) or (needs_t5 and (t5 is None or adapter is None)):
            raise UserError(f"encoder mode '{mode}' needs {'CLIP, ' if mode != 't5' else ''}T5 and the adapter")
        if needs_t5 and clip is not None and adapter.config.out_dim != clip.pad_embedding.shape[-1]:
            raise UserError(
                f"adapter out_dim {adapter.config.out_dim} does not match the CLIP width "
                f"{clip.pad_embedding.shape[-1]}: the adapter belongs to another model"
            )
        if needs_t5 and adapter.config.in_dim != t5.encoder.config.d_model:
            raise UserError(
                f"adapter in_dim {adapter.config.in_dim} does not match the T5 width "
                f"{t5.encoder.config.d_model}: the adapter belongs to another T5"
            )
        self.mode = mode
        self.clip = clip if mode != "t5" else None
        self.t5 = t5 if needs_t5 else None
        self.adapter = adapter if needs_t5 else None

    @property
    def token_length(self) -> int:
        return (self.clip or self.t5).token_length

    def limit_truncation_warnings(self, limit: int | None) -> None:
        """Warn about at most `limit` cut prompts from now on, over both branches (None: every one)."""
        shared = TruncationWarnings(limit)
        for branch in (self.clip, self.t5):
            if branch is not None:
                branch.truncation_warnings = shared

    def splitter(self) -> Callable[[str], list[str]] | None:
        """The CLIP branch's `SegmentCLIPEncoder.splitter` for DataLoader workers; None in mode t5."""
        return self.clip.splitter() if self.clip is not None else None

    @torch.no_grad()
    def encode_frozen(self, prompts: Sequence[str], segments: Sequence[list[str] | None] | None = None) -> FrozenEncoding:
        """Run the frozen encoders. Returns CLIP (B, L, D) / T5 (B, L, 1024) and the reports.
        `segments`: each prompt's CLIP segments, split earlier by `splitter` (see `SegmentCLIPEncoder.forward`)."""
        prompts = list(prompts)
        clip_hidden, reports = (None, None)
        if self.clip is not None:
            clip_hidden, reports = self.clip(prompts, segments)
        t5_hidden = None
        if self.t5 is not None:
            t5_hidden, counts = self.t5(prompts)
            if reports is None:
                reports = [PromptReport(1, 0, 0, 0) for _ in prompts]
            for report, (tokens, dropped) in zip(reports, counts):
                report.t5_tokens, report.t5_tokens_dropped = tokens, dropped
        return FrozenEncoding(clip_hidden, t5_hidden, reports)

    def branches(self, frozen: FrozenEncoding) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The context's two parts from frozen outputs: CLIP rows (B, L, D) and `adapter(t5)` rows
        (B, L, D; gradients flow into the adapter), None for a branch the mode leaves out. For a
        loss term on one branch; `join` then makes the context without running the adapter again."""
        adapted = None
        if frozen.t5 is not None:
            adapted = self.adapter(frozen.t5.to(next(self.adapter.parameters()).dtype))
        return frozen.clip, adapted

    @staticmethod
    def join(clip: torch.Tensor | None, adapted: torch.Tensor | None) -> torch.Tensor:
        """UNet context `cat([clip, adapted], 1)` of the branches present (B, L or 2L, D), in the
        adapter's dtype where it has one."""
        parts = [part for part in (clip, adapted) if part is not None]
        return torch.cat([part.to(parts[-1].dtype) for part in parts], dim=1)

    def context(self, frozen: FrozenEncoding) -> torch.Tensor:
        """UNet context from frozen outputs; gradients flow into the adapter. (B, L or 2L, D)."""
        return self.join(*self.branches(frozen))

    def forward(
        self, prompts: Sequence[str], segments: Sequence[list[str] | None] | None = None
    ) -> tuple[torch.Tensor, list[PromptReport]]:
        """Prompts -> (context (B, L or 2L, D), per-prompt reports); `segments` as in `encode_frozen`."""
        frozen = self.encode_frozen(prompts, segments)
        return self.context(frozen), frozen.reports

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model: str = SD15,
        t5_model: str = T5_LARGE,
        adapter: str | None = None,
        mode: str = "clip+t5",
        token_length: int = 240,
        segmenter: str = "sentences",
        t5_attention_mask: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        adapter_dtype: torch.dtype | None = None,
    ) -> "LongPromptEncoder":
        """Load CLIP (SD1.5 `tokenizer`/`text_encoder`), T5 and the adapter by hub id or local path.

        Every part loads in `dtype`, the adapter in `adapter_dtype` if given (float32 when it trains,
        so it starts from the file's weights rather than from their bf16/fp16 rounding).
        """
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        check_encoder_mode(mode)
        clip = t5 = text_adapter = None
        if mode != "t5":
            tokenizer = load_pretrained(AutoTokenizer, pretrained_model, "CLIP tokenizer", subfolder="tokenizer")
            check_tokenizer(tokenizer, f"{pretrained_model}/tokenizer")
            text_encoder = load_pretrained(CLIPTextModel, pretrained_model, "CLIP text encoder", subfolder="text_encoder")
            text_encoder.requires_grad_(False).eval().to(device, dtype)
            clip = SegmentCLIPEncoder(tokenizer, text_encoder, token_length, segmenter)
        if mode != "clip":
            if adapter is None:
                raise UserError(f"encoder mode '{mode}' needs an adapter folder (--adapter)")
            t5_tokenizer = load_pretrained(AutoTokenizer, t5_model, "T5 tokenizer")
            check_tokenizer(t5_tokenizer, t5_model)
            # dtype at load time, not .to(dtype): under float16 transformers then keeps T5's `wo`
            # projections in float32 (`_keep_in_fp32_modules`), without which T5 overflows to inf.
            t5_encoder = load_pretrained(T5EncoderModel, t5_model, "T5 encoder", dtype=dtype)
            t5_encoder.requires_grad_(False).eval().to(device)
            t5 = T5PromptEncoder(t5_tokenizer, t5_encoder, token_length, t5_attention_mask)
            text_adapter = load_pretrained(TextAdapter, adapter, "text adapter", dtype=adapter_dtype or dtype).to(device)
        return cls(clip, t5, text_adapter, mode)
