"""Preference models and the decomposed reward (paper §4; METHOD.md §4), offline on tiny models."""

import json
import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from longalign.config import RewardArguments
from longalign.loading import UserError
from longalign.reward import (
    CommonDirection,
    DecomposedReward,
    OpenCLIPPreferenceModel,
    RewardConfig,
    auto_text_irrelevant_weight,
    average_segments,
    check_text_irrelevant_weight,
    common_direction,
    compute_common_direction,
    crop_and_resize,
    decompose,
    decomposed_reward,
    load_preference_model,
    preference_loss,
    reweighted_score,
)
from _two_processes import two_cpu_processes

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "A red circle sits in the top left corner. Dr. Smith holds a 3.5 m rope! Two cats sleep on a table.",
    "",
    "Mountains rise above a quiet lake; small boats drift near the shore.",
    "The painting uses soft colors.\n\nA tall man holds a blue umbrella while rain falls.",
]


def _unit(*shape, seed=0, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64) + shift, dim=-1)


# ----------------------------------------------------------------------- pure functions
def test_weight_one_is_the_plain_cosine_score_exactly():
    x, t = _unit(5, 16, seed=1), _unit(5, 16, seed=2, shift=1.0)
    v = common_direction(t).double()
    assert torch.equal(reweighted_score(x, t, v, 1.0), (x * t).sum(-1))


def test_weight_zero_ignores_shifts_along_the_common_direction():
    x, t = _unit(6, 16, seed=3), _unit(6, 16, seed=4, shift=1.0)
    v = common_direction(t).double()
    shifted = t + torch.tensor([0.7, -0.3, 2.0, 0.0, 1.1, -0.9], dtype=t.dtype)[:, None] * v
    assert torch.allclose(reweighted_score(x, shifted, v, 0.0), reweighted_score(x, t, v, 0.0), atol=1e-12)
    # with w = 1 the shift does change the score, so the invariance above is not trivial
    assert not torch.allclose(reweighted_score(x, shifted, v, 1.0), reweighted_score(x, t, v, 1.0), atol=1e-3)
    # a common shift keeps the common direction itself
    shifted_all = t + 0.5 * v
    assert torch.allclose(common_direction(shifted_all).double(), v, atol=1e-6)


def test_decomposition_parts_sum_as_the_formulas_say():
    x, t = _unit(7, 16, seed=5), _unit(7, 16, seed=6, shift=0.8) * 0.9
    v = common_direction(t).double()
    assert torch.isclose(v.norm(), torch.tensor(1.0, dtype=v.dtype))
    parts = decompose(t, v)
    assert torch.allclose(parts.eta, t @ v)
    assert torch.allclose(parts.text_relevant + parts.text_irrelevant, t)
    assert torch.allclose(parts.text_relevant @ v, torch.zeros(7, dtype=t.dtype), atol=1e-12)
    assert torch.allclose(parts.text_irrelevant, parts.eta[:, None] * v)
    for w in (0.0, 0.3, 1.0):
        expected = (x * parts.text_relevant).sum(-1) + w * (x * parts.text_irrelevant).sum(-1)
        assert torch.allclose(reweighted_score(x, t, v, w), expected)
        direct = (x * (t - (1 - w) * (t @ v)[:, None] * v)).sum(-1)
        assert torch.allclose(reweighted_score(x, t, v, w), direct)
    scores = reweighted_score(x, t, v, 0.3)
    assert torch.isclose(preference_loss(scores, 0.3), 0.5 * (1 - scores.mean()))
    assert torch.isclose(preference_loss(scores, 0.3, released_offset=True), 0.5 * (1 - scores.mean()) - 0.09 * 0.7)


def test_text_irrelevant_weight_validation_and_auto():
    assert check_text_irrelevant_weight(0.3) == 0.3
    assert check_text_irrelevant_weight("0.25") == 0.25
    assert check_text_irrelevant_weight("auto") == "auto"
    for bad in (-0.1, 1.5, "abc", "", None, True):
        with pytest.raises(UserError, match="text_irrelevant_weight"):
            check_text_irrelevant_weight(bad)
    assert auto_text_irrelevant_weight(0.8) == pytest.approx(0.3)
    eta = 0.97
    w = auto_text_irrelevant_weight(eta)
    assert w * eta / math.sqrt(1 - eta**2) == pytest.approx(0.4)  # ratio held at 0.4
    assert auto_text_irrelevant_weight(0.1) == 1.0  # clipped
    assert auto_text_irrelevant_weight(1.0) == 0.0 and auto_text_irrelevant_weight(-0.2) == 1.0


def test_average_segments_equals_a_per_prompt_loop():
    segments = _unit(9, 8, seed=7)
    counts = [3, 1, 4, 1]
    expected, start = [], 0
    for count in counts:
        expected.append(segments[start : start + count].mean(0))
        start += count
    assert torch.allclose(average_segments(segments, counts), torch.stack(expected))
    assert not torch.allclose(average_segments(segments, counts).norm(dim=-1), torch.ones(4, dtype=segments.dtype))
    with pytest.raises(ValueError):
        average_segments(segments, [3, 3])


def test_crop_is_one_seeded_window_of_504_of_512_for_the_batch():
    images = torch.rand(3, 3, 64, 64)
    first = crop_and_resize(images, 63, torch.Generator().manual_seed(0))  # 64 * 504/512 = 63: no resize
    again = crop_and_resize(images, 63, torch.Generator().manual_seed(0))
    assert first.shape == (3, 3, 63, 63) and torch.equal(first, again)
    windows = [images[:, :, top : top + 63, left : left + 63] for top in (0, 1) for left in (0, 1)]
    assert sum(torch.equal(first, window) for window in windows) == 1  # one window for the batch, as released
    seeds = {tuple(crop_and_resize(images, 63, torch.Generator().manual_seed(s))[:, 0, 0, 0].tolist()) for s in range(8)}
    assert len(seeds) > 1  # offsets really vary with the seed
    resized = crop_and_resize(torch.rand(2, 3, 40, 80), 16, random_crop=False)
    assert resized.shape == (2, 3, 16, 16)


def test_resize_to_the_scorer_input_is_the_released_one():
    """The release resizes the 504 px crop with torchvision's `Resize((224, 224))`: bilinear, antialiased."""
    from torchvision import transforms

    crops = torch.rand(2, 3, 504, 504)
    torch.testing.assert_close(crop_and_resize(crops, 224, random_crop=False), transforms.Resize((224, 224))(crops))


# --------------------------------------------------------------------- tiny CLIPModel
@pytest.fixture(scope="module")
def scorer(tiny_models):
    return load_preference_model(str(tiny_models["preference"]))


@pytest.fixture(scope="module")
def reference(tiny_models):
    from transformers import AutoTokenizer, CLIPModel

    folder = tiny_models["preference"]
    return CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_single_mode_and_images_equal_a_direct_clipmodel_call(scorer, reference):
    model, tokenizer = reference
    batch = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    images = torch.rand(len(PROMPTS), 3, 32, 32)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], pixel_values=(images - mean) / std)
        ours_text = scorer.embed_texts(PROMPTS, mode="single")
        ours_image = scorer.embed_images(images, random_crop=False)
    assert torch.allclose(ours_text, out.text_embeds, atol=1e-5)
    assert torch.allclose(ours_image, out.image_embeds, atol=1e-5)


def test_segment_mode_equals_a_per_prompt_loop(scorer):
    encoded = scorer.encode_texts(PROMPTS, mode="segment")
    assert encoded.segment_counts[0] == 3 and encoded.segments[1] == [""]
    for index, prompt in enumerate(PROMPTS):
        pieces = scorer.split(prompt)
        assert pieces == encoded.segments[index]
        alone = scorer.embed_texts(pieces, mode="single")  # each segment on its own, normalised
        assert torch.allclose(alone.norm(dim=-1), torch.ones(len(pieces)), atol=1e-5)
        assert torch.allclose(encoded.prompt_embeds[index], alone.mean(0), atol=1e-5)
    assert encoded.prompt_embeds[0].norm() < 0.999  # the mean of several segments is not re-normalised


def test_empty_prompts_embed_and_score(scorer):
    for mode in ("segment", "single"):
        embeds = scorer.embed_texts(["", ""], mode)
        assert embeds.shape == (2, 16) and torch.isfinite(embeds).all()
        assert torch.allclose(embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(UserError, match="segment, single"):
        scorer.embed_texts(["x"], mode="sentences")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, logs = decomposed_reward(scorer, torch.rand(2, 3, 48, 48), ["", ""], CommonDirection("batch"))
    assert math.isfinite(loss.item()) and logs["eta"] == pytest.approx(1.0, abs=1e-5)  # identical prompts: t = V


def test_gradients_reach_pixels_not_the_scorer(scorer):
    images = torch.rand(len(PROMPTS), 3, 64, 64, requires_grad=True)
    scorer.train()  # ignored: the scorer stays in eval mode
    assert not scorer.training and not scorer.model.training
    loss, logs = decomposed_reward(
        scorer, images, PROMPTS, CommonDirection("batch"), 0.3, generator=torch.Generator().manual_seed(0)
    )
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert all(not p.requires_grad and p.grad is None for p in scorer.parameters())
    # the logged parts fit together: score = relevant + irrelevant, reweighted = relevant + w irrelevant
    assert logs["score"] == pytest.approx(logs["score_text_relevant"] + logs["score_text_irrelevant"], abs=1e-5)
    assert logs["score_reweighted"] == pytest.approx(
        logs["score_text_relevant"] + 0.3 * logs["score_text_irrelevant"], abs=1e-5
    )
    assert loss.item() == pytest.approx(0.5 * (1 - logs["score_reweighted"]), abs=1e-6)
    _, auto_logs = decomposed_reward(scorer, images.detach(), PROMPTS, CommonDirection("batch"), "auto")
    assert auto_logs["text_irrelevant_weight"] == pytest.approx(auto_text_irrelevant_weight(auto_logs["eta"]))
    with pytest.raises(UserError):
        decomposed_reward(scorer, images.detach(), PROMPTS, CommonDirection("batch"), 1.2)


def test_decomposed_reward_object_validates_early_and_checkpoints_its_direction(scorer):
    """The options are checked when the config is made, before the stage loads any model."""
    with pytest.raises(UserError, match="text_irrelevant_weight"):
        RewardConfig(text_irrelevant_weight="")
    with pytest.raises(UserError, match="batch, ema, file"):
        RewardConfig(common_direction="global")
    with pytest.raises(UserError, match="unknown text mode 'tokens'"):
        RewardConfig(text_mode="tokens")
    with pytest.raises(UserError, match="needs a path"):
        RewardArguments(common_direction="file")
    config = RewardConfig(text_irrelevant_weight="auto", common_direction="ema", released_loss_offset=True)
    reward = DecomposedReward(config, preference_model=scorer)
    images = torch.rand(2, 3, 40, 40)
    loss, logs = reward(images, PROMPTS[:2], torch.Generator().manual_seed(0))
    w = logs["text_irrelevant_weight"]
    assert 0 <= w <= 1 and loss.item() == pytest.approx(0.5 * (1 - logs["score_reweighted"]) - 0.09 * (1 - w), abs=1e-6)
    resumed = DecomposedReward(config, preference_model=scorer)
    resumed.load_state_dict(reward.state_dict())
    fresh = DecomposedReward(config, preference_model=scorer)
    losses = [r(images, PROMPTS[2:], torch.Generator().manual_seed(1))[0].item() for r in (reward, resumed, fresh)]
    assert losses[0] == losses[1] and losses[2] != pytest.approx(losses[0], abs=1e-7)


# --------------------------------------------------------------------- common direction
def test_batch_of_one_prompt_warns_once():
    direction = CommonDirection("batch")
    t = _unit(1, 8, seed=8).float()
    with pytest.warns(UserWarning, match="ema"):
        v = direction(t)
    assert torch.allclose(v, t[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        direction(t)  # once only
        CommonDirection("batch")(_unit(3, 8, seed=9).float())  # more prompts: no warning
        CommonDirection("ema")(t)


def test_ema_and_file_modes(tmp_path, scorer):
    a, b = _unit(4, 8, seed=10).float(), _unit(4, 8, seed=11, shift=1.0).float()
    ema = CommonDirection("ema", ema_decay=0.9)
    ema(a)
    v = ema(b)
    assert torch.allclose(v, F.normalize(0.9 * a.mean(0) + 0.1 * b.mean(0), dim=0), atol=1e-6)
    restored = CommonDirection("ema", ema_decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert torch.allclose(restored(a), ema(a)) and restored.steps == 3

    path = tmp_path / "direction.safetensors"
    saved = compute_common_direction(scorer, PROMPTS, batch_size=3, path=path)
    assert torch.allclose(saved, common_direction(scorer.embed_texts(PROMPTS)), atol=1e-6)
    assert torch.allclose(CommonDirection("file", path=str(path))(torch.zeros(2, 16)), saved)
    with pytest.raises(UserError, match="width"):
        CommonDirection("file", path=str(path))(torch.zeros(2, 8))
    with pytest.raises(UserError, match="not found"):
        CommonDirection("file", path=str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match="needs a path"):
        CommonDirection("file")
    with pytest.raises(UserError, match="batch, ema, file"):
        CommonDirection("global")


def test_a_direction_file_must_be_a_unit_vector_of_this_text_mode(tmp_path, scorer, caplog):
    from safetensors.torch import save_file

    from longalign.reward import DIRECTION_KEY

    path = tmp_path / "direction.safetensors"
    saved = compute_common_direction(scorer, PROMPTS, path=path)
    with pytest.raises(UserError, match="computed in text mode 'segment', this run uses 'single'"):
        RewardConfig(common_direction="file", common_direction_file=str(path), reward_model=scorer.name, text_mode="single")
    with caplog.at_level(logging.WARNING, logger="longalign.reward"):
        RewardConfig(common_direction="file", common_direction_file=str(path), reward_model="pickscore")
    assert f"computed with preference model '{scorer.name}'; this run uses 'pickscore'" in caplog.text
    save_file({DIRECTION_KEY: 3 * saved}, str(tmp_path / "scaled.safetensors"))  # decompose assumes |V| = 1
    with pytest.raises(UserError, match="norm 3, not 1"):
        CommonDirection("file", path=str(tmp_path / "scaled.safetensors"))


def test_gathered_direction_over_two_processes_equals_one_process(tmp_path, tiny_models):
    from safetensors.torch import load_file

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = REPO / "tests" / "_gather_direction.py"
    command = [*two_cpu_processes(), str(script), str(tmp_path), str(tiny_models["preference"])]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(rank["world"].item() == 2 for rank in ranks)

    generator = torch.Generator().manual_seed(0)
    full = F.normalize(torch.randn(6, 16, generator=generator) + 1.0, dim=-1)
    second = F.normalize(torch.randn(6, 16, generator=generator) - 0.5, dim=-1)
    expected_ema = F.normalize(0.9 * full.mean(0) + 0.1 * second.mean(0), dim=0)
    for rank in ranks:
        assert torch.allclose(rank["batch"], common_direction(full), atol=1e-6)
        assert torch.allclose(rank["ema"], expected_ema, atol=1e-6)
        assert torch.allclose(rank["one_each"], common_direction(full[:2]), atol=1e-6)
        assert rank["warned"].item() == 0  # one prompt per rank is two prompts globally
    # w = auto comes from the mean eta of all four prompts, so both ranks train with the same w
    global_eta = torch.cat([ranks[0]["etas"], ranks[1]["etas"]]).mean().item()
    for rank in ranks:
        assert rank["auto_weight"].item() == pytest.approx(auto_text_irrelevant_weight(global_eta), rel=1e-5)


# ------------------------------------------------------------------------ open_clip backend
TINY_OPEN_CLIP = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2),
)


@pytest.fixture(scope="module")
def open_clip_folder(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("open_clip_tiny")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_OPEN_CLIP)
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    config = {"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


def test_open_clip_backend_matches_encode_text_and_encode_image(open_clip_folder):
    import open_clip

    model = open_clip.create_model(f"local-dir:{open_clip_folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{open_clip_folder}")
    scorer = OpenCLIPPreferenceModel(model, tokenizer)
    assert all(not p.requires_grad for p in scorer.parameters()) and not scorer.training
    images = torch.rand(3, 3, 32, 32)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
        image = F.normalize(model.encode_image((images - mean) / std), dim=-1)
    assert torch.allclose(scorer.embed_texts(PROMPTS, "single"), text, atol=1e-5)
    assert torch.allclose(scorer.embed_images(images, random_crop=False), image, atol=1e-5)
    encoded = scorer.encode_texts(PROMPTS, "segment")
    assert encoded.segment_counts == [3, 1, 2, 2]
    assert torch.allclose(encoded.prompt_embeds[0], scorer.embed_texts(encoded.segments[0], "single").mean(0), atol=1e-5)
    # the loader finds the same model by folder and by the open_clip: prefix
    for name in (str(open_clip_folder), f"open_clip:local-dir:{open_clip_folder}"):
        loaded = load_preference_model(name)
        assert isinstance(loaded, OpenCLIPPreferenceModel)
        assert torch.allclose(loaded.embed_texts(PROMPTS, "single"), text, atol=1e-5)
    pixels = torch.rand(2, 3, 40, 40, requires_grad=True)
    loss, _ = decomposed_reward(scorer, pixels, PROMPTS[:2], CommonDirection("batch"), 0.3)
    loss.backward()
    assert pixels.grad.abs().sum() > 0 and all(p.grad is None for p in scorer.parameters())


def test_every_segmenter_runs_on_both_kinds_of_tokenizer(open_clip_folder, tiny_models):
    """A segmenter splits for SD1.5's CLIP tokenizer and for a preference model's, which may be an
    open_clip one behind `_OpenCLIPSegmentTokenizer`: each registered rule runs on both as the
    encoders call it (`text_encoding.Segmenter`), and the slice they offer includes `decode`."""
    import open_clip
    from transformers import AutoTokenizer

    from longalign.reward import _OpenCLIPSegmentTokenizer
    from longalign.text_encoding import SEGMENTERS

    clip = AutoTokenizer.from_pretrained(tiny_models["sd15"] / "tokenizer")
    wrapped = _OpenCLIPSegmentTokenizer(open_clip.get_tokenizer(f"local-dir:{open_clip_folder}"), 77)
    prompt = " ".join(PROMPTS) + " " + "a very long sentence with many words, " * 12
    for name, segmenter in SEGMENTERS.items():
        for tokenizer in (clip, wrapped):
            segments = segmenter(prompt, tokenizer=tokenizer)
            assert segments and all(isinstance(segment, str) for segment in segments), (name, type(tokenizer))
    for tokenizer in (clip, wrapped):
        ids = tokenizer("a red cat on a mat", add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids).strip() == "a red cat on a mat" and len(tokenizer) == 49408


def test_unknown_or_unreachable_models_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="denscore, pickscore, clip_h, hpsv2"):
        load_preference_model("imagereward")
    with pytest.raises(UserError, match="open_clip model"):
        load_preference_model("open_clip:")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_preference_model(str(tmp_path / "empty"))
    if os.environ.get("HF_HUB_OFFLINE") == "1":  # no hub: registry entries fail with a hint, fast
        with pytest.raises(UserError, match="local"):
            load_preference_model("denscore")
        with pytest.raises(UserError, match="open_clip:ViT-H-14:"):
            load_preference_model("hpsv2")


# ------------------------------------------------------------------------ analysis CLI
def _write_analysis_inputs(folder: Path, count: int) -> tuple[Path, Path]:
    from PIL import Image

    generator = torch.Generator().manual_seed(1)
    images = folder / "images"
    images.mkdir(parents=True)
    specs = [("RGB", (40, 52)), ("L", (32, 32)), ("RGBA", (64, 48)), ("P", (30, 45)), ("RGB", (33, 70))]
    for index in range(count):
        mode, size = specs[index % len(specs)]
        array = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(array, "RGB").convert(mode).save(images / f"{index:03d}.png")
    prompts = folder / "prompts.txt"
    lines = [" ".join(prompt.split()) for prompt in PROMPTS] + ["A green field. A white house.", "A blue sky.", "A red door."]
    prompts.write_text("\n".join(lines) + "\n\n")  # 6 prompts: blank lines are skipped, as sample.py does
    return prompts, images


def test_analysis_cli_writes_its_reports(tmp_path, tiny_models):
    prompts, images = _write_analysis_inputs(tmp_path, 6)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "longalign.analyze_preference", "--model", str(tiny_models["preference"]),
        "--prompts", str(prompts), "--images", str(images), "--out", str(out), "--batch_size", "4", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("eta.json", "eta_hist.png", "decomposition.json", "decomposition.png", "retrieval.json", "retrieval.md"):
        assert (out / name).stat().st_size > 0, name
    eta = json.loads((out / "eta.json").read_text())
    assert eta["prompts"] == 6 and -1 <= eta["eta"]["mean"] <= 1 and eta["segments"] >= 9
    decomposition = json.loads((out / "decomposition.json").read_text())
    for pairing in ("paired", "unpaired"):
        parts = decomposition[pairing]
        total = parts["text_relevant"]["mean"] + parts["text_irrelevant"]["mean"]
        assert parts["original"]["mean"] == pytest.approx(total, abs=1e-5)
    retrieval = json.loads((out / "retrieval.json").read_text())
    assert all(0 <= retrieval[m][p] <= 1 for m in ("single", "segment") for p in ("original", "text_relevant"))
    assert "| text-relevant |" in (out / "retrieval.md").read_text()

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "holds an earlier analysis (eta.json); pass another --out, or --overwrite" in result.stderr
    command.append("--overwrite")
    (images / "005.png").unlink()
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "5 images but the prompts file has 6" in result.stderr


def test_image_matching_rules_and_recall(tmp_path):
    from longalign.analyze_preference import match_images, recall_at_1

    folder = tmp_path / "named"
    folder.mkdir()
    for name in ("b.png", "a.jpg", "c.webp"):
        (folder / name).write_bytes(b"")
    (folder / "notes.txt").write_text("ignored")
    assert [p.name for p in match_images(str(folder), 3)] == ["a.jpg", "b.png", "c.webp"]
    indexed = tmp_path / "indexed"
    indexed.mkdir()
    for name in ("10.png", "2.png", "0.png"):
        (indexed / name).write_bytes(b"")
    with pytest.raises(UserError, match="0..2"):
        match_images(str(indexed), 3)
    (indexed / "10.png").rename(indexed / "1.png")
    assert [p.name for p in match_images(str(indexed), 3)] == ["0.png", "1.png", "2.png"]
    x = torch.eye(4)
    assert recall_at_1(x, x) == 1.0
    assert recall_at_1(x, x[[1, 0, 2, 3]]) == 0.5


def test_analysis_refuses_what_it_cannot_analyse_before_any_work(tmp_path, capsys):
    """One line before any embedding: an --out that is a file (it failed after the work), an
    unknown device, and a single prompt (V would be its own direction: eta 1, R@1 1)."""
    from longalign import analyze_preference
    from longalign.toyworld import MakeConfig

    prompts, images = _write_analysis_inputs(tmp_path, 6)
    (tmp_path / "a_file").write_text("x")
    one = tmp_path / "one.txt"
    one.write_text("A red door.\n")
    common = ["--model", "/no/such/model", "--images", str(images)]
    for flags, message in [
        (["--prompts", str(prompts), "--out", str(tmp_path / "a_file")], "is a file, not a folder"),
        (["--prompts", str(prompts), "--out", str(tmp_path / "out"), "--device", "foo"], "unknown --device 'foo'"),
        (["--prompts", str(one), "--out", str(tmp_path / "out")], "needs at least 2"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            analyze_preference.main([*common, *flags])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown --device"):
        MakeConfig(device="foo")  # the toy world checks it before writing its data
