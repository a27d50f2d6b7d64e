"""Segment-level encoding: segmenters, the exact token policy, reports, adapter, modes (issue 2)."""

import copy
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from longalign.adapter import TextAdapter
from longalign.loading import UserError
from longalign.text_encoding import (
    LongPromptEncoder,
    SegmentCLIPEncoder,
    get_segmenter,
    split_legacy,
    split_sentences,
)

WORDS = "red green blue cat dog tree house river stone cloud bird fish sun moon star road car boat hill lake"
WORDS_200 = " ".join([WORDS] * 10)  # one 200-token sentence (one CLIP token per word), no punctuation


@pytest.fixture(scope="module")
def encoder(tiny_models):
    return LongPromptEncoder.from_pretrained(tiny_models["sd15"], tiny_models["t5"], tiny_models["adapter"])


@pytest.fixture(scope="module")
def tokenizer(encoder):
    return encoder.clip.tokenizer


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------ segmenters
def test_sentences_goldens(tokenizer):
    text = "Dr. Smith is 3.5 m tall, e.g. taller than me! Is he? Yes; he is.\n\nA new paragraph"
    assert split_sentences(text, tokenizer) == [
        "Dr. Smith is 3.5 m tall, e.g. taller than me!",
        "Is he?",
        "Yes;",
        "he is.",
        "A new paragraph",
    ]
    assert split_sentences("", tokenizer) == [""]
    assert split_sentences("   \n\n  \t", tokenizer) == [""]
    assert split_sentences("cat", tokenizer) == ["cat"]
    assert split_sentences("A cat 🐱 sits, naïve café. 日本語の文です。 Ok!", tokenizer) == [
        "A cat 🐱 sits, naïve café.",
        "日本語の文です。",
        "Ok!",
    ]


def test_training_captions_split_as_sampling_prompts(encoder, tokenizer):
    """A dataset caption is normalised before the DataLoader splits it; a paragraph break that no
    full stop ends must still end a segment, as it does in the raw prompt `sample.py` splits."""
    from longalign.data import normalize_caption

    caption = "Overview: a  farm scene \n \n\tA red barn stands on the left. The sky is blue\n\n\n"
    assert normalize_caption(caption) == "Overview: a farm scene\n\nA red barn stands on the left. The sky is blue"
    expected = ["Overview: a farm scene", "A red barn stands on the left.", "The sky is blue"]
    assert split_sentences(normalize_caption(caption), tokenizer) == split_sentences(caption, tokenizer) == expected
    # The legacy rule keeps the break inside a segment, and CLIP and T5 read it as a space: the
    # encoding is the one of the caption with its paragraphs joined by a space.
    joined = " ".join(caption.split())
    with torch.no_grad():
        legacy = SegmentCLIPEncoder(tokenizer, encoder.clip.text_encoder, segmenter="legacy")
        kept_clip, joined_clip = legacy([normalize_caption(caption), joined])[0]
        kept_t5, joined_t5 = encoder.t5([normalize_caption(caption), joined])[0]
    assert torch.equal(kept_clip, joined_clip) and torch.equal(kept_t5, joined_t5)


def test_legacy_goldens():
    text = "Dr. Smith is 3.5 m tall! Is he? Yes; he is."
    assert split_legacy(text) == ["Dr.", "Smith is 3.", "5 m tall! Is he.", "Yes; he is."]
    assert split_legacy("") == [""]
    assert split_legacy("cat") == ["cat."]
    # As released: whitespace-only pieces are kept (as "."), a prompt of delimiters is one segment,
    # and the regex's quotes make it split on the literal pairs '"!' and ';"', not on '!' or ';'.
    assert split_legacy("   ") == ["."]
    assert split_legacy("a. . b") == ["a.", ".", "b."]
    assert split_legacy("A cat. A dog. ") == ["A cat.", "A dog.", "."]
    assert split_legacy("...") == ["..."]
    assert split_legacy('He said "hi;" then left! Wow"! ok') == ['He said "hi.', "then left! Wow.", "ok."]
    assert split_legacy("A cat 🐱. naïve?") == ["A cat 🐱.", "naïve."]
    assert split_legacy(WORDS_200) == [WORDS_200 + "."]  # released: one segment, truncated later


def test_long_sentence_is_split_never_truncated(tokenizer):
    segments = split_sentences(WORDS_200, tokenizer)
    assert len(segments) == 3
    assert all(n_tokens(tokenizer, s) <= 75 for s in segments)
    assert " ".join(segments) == WORDS_200

    with_commas = ", ".join(f"clause number {i} of the list" for i in range(30)) + "."
    segments = split_sentences(with_commas, tokenizer)
    assert all(n_tokens(tokenizer, s) <= 75 for s in segments)
    assert all(s.endswith((",", ".")) for s in segments)  # cut at commas, not inside clauses
    assert " ".join(segments) == with_commas


def test_enormous_prompts(tokenizer):
    huge = ("A tall tree stands near a river, its leaves green and gold. " * 300).strip()  # ~5,000 tokens
    segments = split_sentences(huge, tokenizer)
    assert len(segments) == 300 and all(n_tokens(tokenizer, s) <= 75 for s in segments)
    no_spaces = "x" * 3000
    segments = split_sentences(no_spaces, tokenizer)
    assert "".join(segments) == no_spaces and all(n_tokens(tokenizer, s) <= 75 for s in segments)


def test_unknown_segmenter():
    with pytest.raises(UserError, match="sentences, legacy"):
        get_segmenter("regex")


# ----------------------------------------------------------------------------- token policy
def plain_clip(clip, text):
    """SD's standard encoding: (77, D) hidden states and the number of real tokens (sot+content+eot)."""
    batch = clip.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = clip.text_encoder(batch["input_ids"]).last_hidden_state[0]
    return hidden, int(batch["attention_mask"].sum())


def test_pad_embedding_is_mean_of_empty_prompt_padding(encoder):
    clip = encoder.clip
    hidden, _ = plain_clip(clip, "")
    torch.testing.assert_close(clip.pad_embedding, hidden[17:77].mean(0))  # the released rule, spelled out: the last 60
    short = copy.deepcopy(clip.tokenizer)
    short.model_max_length = 61  # one position short of <sot>, <eot> and the 60 padding positions
    with pytest.raises(UserError, match="window is 61 tokens"):
        SegmentCLIPEncoder(short, clip.text_encoder)


def test_one_segment_prompt_equals_plain_clip_then_pad(encoder):
    clip = encoder.clip
    prompt = "a red circle in the top left corner"
    hidden, n_real = plain_clip(clip, prompt)
    with torch.no_grad():
        encoded, (report,) = clip([prompt])
    kept = n_real - 1  # <sot> + content, <eot> dropped
    torch.testing.assert_close(encoded[0, :kept], hidden[:kept], rtol=0, atol=1e-6)
    torch.testing.assert_close(encoded[0, kept:], clip.pad_embedding.expand(240 - kept, -1), rtol=0, atol=0)
    assert (report.segments, report.content_tokens, report.tokens_kept, report.tokens_dropped) == (1, kept - 1, kept - 1, 0)


def test_empty_prompt_is_sot_then_pad(encoder):
    clip = encoder.clip
    hidden, _ = plain_clip(clip, "")
    for prompt in ("", "   "):
        with torch.no_grad():
            encoded, _ = clip([prompt])
        assert encoded.shape == (1, 240, clip.pad_embedding.shape[0])
        torch.testing.assert_close(encoded[0, 0], hidden[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(encoded[0, 1:], clip.pad_embedding.expand(239, -1), rtol=0, atol=0)


def test_three_segments_row_by_row(encoder):
    clip = encoder.clip
    segments = ["A red circle is on the left.", "A blue square is in the middle!", "Is there a green triangle?"]
    with torch.no_grad():
        encoded, (report,) = clip([" ".join(segments)])
    assert report.segments == 3
    row = 0
    for segment in segments:
        hidden, n_real = plain_clip(clip, segment)
        kept = n_real - 1
        torch.testing.assert_close(encoded[0, row : row + kept], hidden[:kept], rtol=0, atol=1e-6)
        torch.testing.assert_close(encoded[0, row], hidden[0])  # every segment keeps its <sot>
        row += kept
    torch.testing.assert_close(encoded[0, row:], clip.pad_embedding.expand(240 - row, -1), rtol=0, atol=0)


def test_segments_split_earlier_are_encoded_as_given(encoder):
    """The DataLoader workers split the captions (`splitter`, pickled to them); the encoder then uses
    those segments, and splits a prompt itself where its entry is None."""
    import pickle

    prompts = ["A red circle is on the left. A blue square is in the middle!", "Is there a green triangle?"]
    split = pickle.loads(pickle.dumps(encoder.clip.splitter()))
    assert [split(p) for p in prompts] == [encoder.clip.split(p) for p in prompts]
    with torch.no_grad():
        plain = encoder.encode_frozen(prompts)
        given = encoder.encode_frozen(prompts, [split(p) for p in prompts])
        mixed = encoder.encode_frozen(prompts, [None, split(prompts[1])])
        other = encoder.encode_frozen(prompts, [["A green star."], None])  # used as given, not re-split
        star = encoder.encode_frozen(["A green star."])
    for result in (given, mixed):  # the same segments in the same CLIP batch: equal to the bit
        assert torch.equal(result.clip, plain.clip) and torch.equal(result.t5, plain.t5)
        assert [r.segments for r in result.reports] == [r.segments for r in plain.reports] == [2, 1]
    for encoded, expected in ((other.clip[0], star.clip[0]), (other.clip[1], plain.clip[1])):  # CLIP batches differ
        torch.testing.assert_close(encoded, expected, rtol=0, atol=1e-6)
    assert torch.equal(other.t5, plain.t5)  # T5 reads the whole prompt, never the segments
    with pytest.raises(ValueError, match="1 segment lists for 2 prompts"):
        encoder.encode_frozen(prompts, [None])
    with pytest.raises(ValueError, match="segment list is empty"):
        encoder.encode_frozen(prompts, [[], None])


def test_padding_decided_by_length_not_id(encoder, tiny_models):
    """A tokenizer that pads with `!` (as SD2's does) keeps literal `!` tokens."""
    bang_tokenizer = AutoTokenizer.from_pretrained(tiny_models["sd15"] / "tokenizer", pad_token="!")
    bang_id = bang_tokenizer.convert_tokens_to_ids("!")
    assert bang_tokenizer.pad_token_id == bang_id
    clip = SegmentCLIPEncoder(bang_tokenizer, encoder.clip.text_encoder)
    prompt = "Wow! Stop!! A much longer second sentence follows here, with many more words in it."
    with torch.no_grad():
        encoded, (report,) = clip([prompt])
    segments = clip.split(prompt)
    content = sum(n_tokens(bang_tokenizer, s) for s in segments)
    assert report.content_tokens == report.tokens_kept == content
    row = 0
    for segment in segments:  # short segments padded with `!` inside the batch keep their own `!`
        ids = bang_tokenizer(segment)["input_ids"]
        with torch.no_grad():
            hidden = clip.text_encoder(torch.tensor([ids])).last_hidden_state[0]
        torch.testing.assert_close(encoded[0, row : row + len(ids) - 1], hidden[:-1], rtol=0, atol=1e-6)
        row += len(ids) - 1


# ---------------------------------------------------------------------------------- reports
def test_overlong_prompt_is_reported_and_warned(encoder, caplog):
    long_prompt = " ".join(f"Sentence {i} describes object {i} in great detail." for i in range(40))
    with caplog.at_level(logging.WARNING, logger="longalign.text_encoding"):
        with torch.no_grad():
            _, (report,) = encoder.clip([long_prompt])
    assert report.tokens_dropped > 0
    assert report.tokens_kept + report.tokens_dropped == report.content_tokens
    assert report.cut_segment is not None and report.cut_text.startswith("Sentence")
    assert f"{report.tokens_dropped} of {report.content_tokens}" in caplog.text
    assert f"segment {report.cut_segment + 1}/{report.segments}" in caplog.text
    assert "prompt 'Sentence 0 describes object 0 in great d...': " in caplog.text  # its words, not a batch index


def test_training_names_a_few_cut_prompts_then_stops(encoder, caplog):
    """A long-caption dataset cuts many captions: training warns about the first few only (over
    both branches), then says once that the rest are not shown; sample.py warns about each."""
    prompts = [" ".join(f"Prompt {k} sentence {i} describes object {i} in detail." for i in range(40)) for k in range(3)]
    encoder.limit_truncation_warnings(2)
    try:
        with caplog.at_level(logging.WARNING, logger="longalign.text_encoding"), torch.no_grad():
            encoder(prompts)
            encoder(prompts)
    finally:
        encoder.limit_truncation_warnings(None)
    lines = caplog.text.splitlines()
    assert sum("prompt 'Prompt" in line for line in lines) == 2
    assert sum("their warnings are not shown" in line for line in lines) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="longalign.text_encoding"), torch.no_grad():
        encoder(prompts)
    assert sum("prompt 'Prompt" in line for line in caplog.text.splitlines()) == 6  # 3 prompts x (CLIP, T5)


def test_200_tokens_fit_240(encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="longalign.text_encoding"):
        with torch.no_grad():
            _, (report,) = encoder.clip([WORDS_200])
    assert report.content_tokens == 200 and report.tokens_dropped == 0
    assert "dropped" not in caplog.text


def test_segments_past_the_cut_skip_clip(encoder):
    """Only segments with kept rows go through CLIP: 100 x "A dog." (4 rows each) needs 60 of them."""
    seen = []
    hook = encoder.clip.text_encoder.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            long_context, (long_report,) = encoder.clip(["A dog. " * 100])
            cut_context, (cut_report,) = encoder.clip(["A dog. " * 60])
    finally:
        hook.remove()
    assert seen == [60, 60]
    assert torch.equal(long_context, cut_context)
    assert (long_report.segments, long_report.tokens_kept, long_report.tokens_dropped) == (100, 180, 120)
    assert cut_report.tokens_dropped == 0
    with pytest.raises(UserError, match="--token_length"):
        SegmentCLIPEncoder(encoder.clip.tokenizer, encoder.clip.text_encoder, token_length=0)


def test_token_length_smaller_than_a_segment(encoder):
    clip = SegmentCLIPEncoder(encoder.clip.tokenizer, encoder.clip.text_encoder, token_length=5)
    with torch.no_grad():
        encoded, (report,) = clip(["one two three four five six seven eight"])
    assert encoded.shape[1] == 5
    assert (report.tokens_kept, report.tokens_dropped, report.cut_segment) == (4, 4, 0)


def test_legacy_segment_beyond_window_counts_as_dropped(encoder):
    clip = SegmentCLIPEncoder(encoder.clip.tokenizer, encoder.clip.text_encoder, segmenter="legacy")
    with torch.no_grad():
        _, (report,) = clip([WORDS_200])
    assert report.segments == 1 and report.tokens_kept == 75 and report.tokens_dropped == 126  # + "."


# ------------------------------------------------------------------------- composite, modes
def test_modes_and_shapes(tiny_models, encoder):
    prompts = ["", "cat", WORDS_200, "A dog. " * 100]  # mixed lengths in one batch
    width = encoder.clip.pad_embedding.shape[0]
    context, reports = encoder(prompts)
    assert context.shape == (4, 480, width) and len(reports) == 4
    assert reports[3].t5_tokens_dropped > 0
    for mode, length in (("clip", 240), ("t5", 240)):
        single = LongPromptEncoder.from_pretrained(tiny_models["sd15"], tiny_models["t5"], tiny_models["adapter"], mode=mode)
        context, _ = single(prompts)
        assert context.shape == (4, length, width)
    clip_only = LongPromptEncoder(encoder.clip, None, None, mode="clip")
    torch.testing.assert_close(clip_only(prompts)[0], encoder(prompts)[0][:, :240])
    frozen = encoder.encode_frozen(prompts)  # a loss term on one branch: the context's own parts
    clip_rows, adapted = encoder.branches(frozen)
    assert adapted.shape == (4, 240, width) and clip_only.branches(clip_only.encode_frozen(prompts))[1] is None
    torch.testing.assert_close(encoder.join(clip_rows, adapted), encoder.context(frozen), rtol=0, atol=0)
    torch.testing.assert_close(encoder.context(frozen)[:, 240:], adapted, rtol=0, atol=0)


def test_adapter_receives_gradient_and_frozen_encoders_do_not(encoder):
    context, _ = encoder(["a cat on a mat"])
    context.sum().backward()
    assert all(p.grad is not None for p in encoder.adapter.parameters())
    assert all(p.grad is None for p in encoder.clip.text_encoder.parameters())
    encoder.adapter.zero_grad(set_to_none=True)


def test_t5_branch_is_t5_on_the_whole_prompt_with_eos_and_no_mask(encoder):
    """METHOD.md §2: the tokenizer's default call (`</s>` appended), padded to 240, no attention mask."""
    t5 = encoder.t5
    prompt = "A red circle. A blue square on the right; a green star."
    ids = t5.tokenizer(prompt)["input_ids"]
    assert ids[-1] == t5.tokenizer.eos_token_id
    padded = torch.tensor([ids + [t5.tokenizer.pad_token_id] * (240 - len(ids))])
    with torch.no_grad():
        expected = t5.encoder(input_ids=padded).last_hidden_state
        ours, _ = t5([prompt])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_t5_attention_mask_flag_changes_output(tiny_models):
    kwargs = dict(mode="t5")
    plain = LongPromptEncoder.from_pretrained(tiny_models["sd15"], tiny_models["t5"], tiny_models["adapter"], **kwargs)
    masked = LongPromptEncoder.from_pretrained(
        tiny_models["sd15"], tiny_models["t5"], tiny_models["adapter"], t5_attention_mask=True, **kwargs
    )
    assert not torch.allclose(plain(["a red circle"])[0], masked(["a red circle"])[0])


def test_float16_keeps_t5_feed_forward_output_in_float32(tiny_models, encoder):
    """T5 overflows in float16 unless its `wo` projections stay float32, which transformers does only
    when the dtype is given at load time (a later `.to(float16)` would cast them too)."""
    half = LongPromptEncoder.from_pretrained(
        tiny_models["sd15"], tiny_models["t5"], tiny_models["adapter"], dtype=torch.float16
    )
    dtypes = {name: p.dtype for name, p in half.t5.encoder.named_parameters()}
    assert any(name.endswith("DenseReluDense.wo.weight") for name in dtypes)
    assert all((d == torch.float32) == (".wo." in name) for name, d in dtypes.items()), dtypes
    assert half.clip.text_encoder.dtype == half.adapter.dtype == torch.float16
    context, _ = half(["A red circle. A blue square."])
    assert context.dtype == torch.float16 and torch.isfinite(context).all()
    torch.testing.assert_close(context.float(), encoder(["A red circle. A blue square."])[0], atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------- adapter
RELEASED_ADAPTER_KEYS = {
    "norm1.weight": ("in",), "norm1.bias": ("in",),
    "ff1.net.0.proj.weight": ("8in", "in"), "ff1.net.0.proj.bias": ("8in",),
    "ff1.net.2.weight": ("int", "4in"), "ff1.net.2.bias": ("int",),
    "norm2.weight": ("int",), "norm2.bias": ("int",),
    "ff2.net.0.proj.weight": ("8int", "int"), "ff2.net.0.proj.bias": ("8int",),
    "ff2.net.2.weight": ("out", "4int"), "ff2.net.2.bias": ("out",),
}  # fmt: skip


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_released_adapter_folder_loads_cleanly(tmp_path, file_format):
    dims = {"in": 12, "int": 10, "out": 8}
    dims.update({"8in": 96, "4in": 48, "8int": 80, "4int": 40})
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(*(dims[d] for d in shape), generator=generator) for k, shape in RELEASED_ADAPTER_KEYS.items()}
    config = {"_class_name": "TextAdapter", "_diffusers_version": "0.20.0", "in_dim": 12, "int_dim": 10, "out_dim": 8}
    (tmp_path / "config.json").write_text(json.dumps(config))
    if file_format == "safetensors":
        save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    else:  # the released LaVi-Bridge folder holds a pickled .bin state dict
        torch.save(state, tmp_path / "diffusion_pytorch_model.bin")
    adapter, info = TextAdapter.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, value in adapter.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_adapter_round_trip_exact(tmp_path):
    adapter = TextAdapter(in_dim=16, int_dim=12, out_dim=8).eval()
    adapter.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = TextAdapter.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 5, 16)
    assert torch.equal(adapter(x), loaded(x))


# -------------------------------------------------------------------------------- bad input
def test_missing_model_path_names_it(tiny_models):
    with pytest.raises(UserError, match="no/such/folder"):
        LongPromptEncoder.from_pretrained("./no/such/folder", tiny_models["t5"], tiny_models["adapter"])


def test_damaged_local_folder_is_named_as_local(tiny_models, tmp_path):
    shutil.copytree(tiny_models["adapter"], tmp_path / "adapter")
    (tmp_path / "adapter" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="could not load text adapter from .*damaged") as caught:
        LongPromptEncoder.from_pretrained(tiny_models["sd15"], tiny_models["t5"], tmp_path / "adapter")
    assert "hub" not in str(caught.value) and "\n" not in str(caught.value)


def test_adapter_from_another_model_is_refused(tiny_models, tmp_path):
    TextAdapter(in_dim=32, int_dim=24, out_dim=16).save_pretrained(tmp_path / "clip")
    with pytest.raises(UserError, match="out_dim 16 does not match the CLIP width"):
        LongPromptEncoder.from_pretrained(tiny_models["sd15"], tiny_models["t5"], tmp_path / "clip")
    width = TextAdapter.from_pretrained(tiny_models["adapter"]).config.out_dim
    TextAdapter(in_dim=48, int_dim=24, out_dim=width).save_pretrained(tmp_path / "t5")
    with pytest.raises(UserError, match="in_dim 48 does not match the T5 width"):
        LongPromptEncoder.from_pretrained(tiny_models["sd15"], tiny_models["t5"], tmp_path / "t5")


@pytest.mark.parametrize("part", ["t5", "text_encoder"])
def test_weights_missing_from_a_folder_are_refused_not_left_random(tiny_models, tmp_path, part):
    """transformers leaves weights a checkpoint lacks at their random initial values with a
    warning only; a renamed or foreign checkpoint must be refused in one line."""
    from safetensors.torch import load_file, save_file

    t5, sd15 = tmp_path / "t5", tmp_path / "sd15"
    shutil.copytree(tiny_models["t5"], t5)
    shutil.copytree(tiny_models["sd15"], sd15)
    weights = (t5 if part == "t5" else sd15 / "text_encoder") / "model.safetensors"
    save_file({f"renamed.{key}": value for key, value in load_file(weights).items()}, weights)
    what = "T5 encoder" if part == "t5" else "CLIP text encoder"
    with pytest.raises(UserError, match=f"{what} at .* lacks .* weights .*damaged or holds another kind of model") as caught:
        LongPromptEncoder.from_pretrained(sd15, t5, tiny_models["adapter"])
    assert "\n" not in str(caught.value)


def test_empty_tokenizer_folder_is_refused(tiny_models, tmp_path):
    broken = tmp_path / "sd15"
    shutil.copytree(tiny_models["sd15"], broken)
    (broken / "tokenizer" / "vocab.json").unlink()
    (broken / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(UserError, match="tokenizer"):
        LongPromptEncoder.from_pretrained(broken, tiny_models["t5"], tiny_models["adapter"], mode="clip")
