"""The toy long-prompt world (issue 7): oracle, captions, token policy, sampler, folders, toy CLIP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longalign import toyworld as tw
from longalign.toyworld_models import PlainPromptEncoder, ddim_sample, toy_clip_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return tw.build_tokenizer()


@pytest.fixture(scope="module")
def scenes():
    return tw.sample_scenes(96, seed=3)


def run(args, cwd, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[:4]} failed ({result.returncode}):\n{result.stdout[-4000:]}")
    return result


# ------------------------------------------------------------------------------ oracle
def test_oracle_reads_rendered_images_exactly(scenes, tokenizer, tmp_path):
    images = []
    for k, scene in enumerate(scenes):
        path = tmp_path / f"{k}.png"
        tw.to_pil(tw.render(scene)).save(path)  # through 8-bit PNG, as the dataset stores them
        from PIL import Image

        images.append(tw.from_pil(Image.open(path)))
    result = tw.score_images(torch.stack(images), scenes, tokenizer)
    assert result["all"]["objects"] == sum(len(s.objects) for s in scenes)
    for key in ("all", "before", "after"):
        assert result[key]["colour"] == 1.0 and result[key]["colour_shape"] == 1.0, key
    assert result["hallucination"] == 0.0 and result["unstated_cells"] == 9 * len(scenes) - result["all"]["objects"]


def test_oracle_detects_wrong_colour_shape_and_extra_objects(tokenizer):
    scene = tw.ToyScene([tw.ToyObject(0, "red", "circle"), tw.ToyObject(4, "blue", "square")], "", [])
    for obj in [tw.ToyObject(0, c, s) for c in tw.COLOURS for s in tw.SHAPES]:
        reading = tw.read_image(tw.render([obj]))[0]
        assert (reading.present, reading.colour, reading.shape) == (True, obj.colour, obj.shape)
    wrong = tw.render([tw.ToyObject(0, "green", "circle"), tw.ToyObject(4, "blue", "triangle"), tw.ToyObject(8, "cyan", "square")])
    readings = tw.read_image(wrong)
    assert readings[0].colour == "green" and readings[4].shape == "triangle" and readings[8].present
    assert not tw.read_image(torch.zeros(3, 32, 32))[0].present
    noisy = (tw.render(scene) + 0.08 * torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    readings = tw.read_image(noisy)
    assert (readings[0].colour, readings[0].shape, readings[4].colour, readings[4].shape) == ("red", "circle", "blue", "square")
    assert sum(r.present for r in readings) == 2


# ------------------------------------------------------------------------------ captions
def test_captions_token_spans_and_positions(scenes, tokenizer):
    forbidden = set(tw.COLOURS) | set(tw.SHAPES) | {"top", "bottom", "left", "right", "middle", "centre", "cell"}
    for sentence in tw.FILLER_SENTENCES:
        assert not forbidden & {w.lower() for w in tw._WORD.findall(sentence)}, sentence
    where_counts = {p: 0 for p in tw.POSITIONS}
    for scene in scenes:
        ids = tokenizer(scene.caption, add_special_tokens=False)["input_ids"]
        assert tw.CAPTION_TOKENS[0] <= len(ids) <= tw.CAPTION_TOKENS[1]
        assert tokenizer.unk_token_id not in ids
        assert 3 <= len(scene.objects) <= 5 and len(scene.cells()) == len(scene.objects)
        for obj, span, (first, last, where) in zip(scene.objects, scene.sentence_spans, tw.sentence_positions(scene, tokenizer)):
            sentence = scene.caption[span[0] : span[1]]
            assert obj.colour in sentence and obj.shape in sentence and tw.CELLS[obj.cell] in sentence
            assert ids[first : last + 1] == tokenizer(sentence, add_special_tokens=False)["input_ids"]
            assert where == ("before" if last < 75 else "after" if first >= 75 else "straddles")
            where_counts[where] += 1
    total = sum(where_counts.values())
    assert 0.35 < where_counts["after"] / total < 0.75 and where_counts["before"] / total > 0.2


def test_scenes_are_seeded():
    a, b, c = tw.sample_scenes(4, 7), tw.sample_scenes(4, 7), tw.sample_scenes(4, 8)
    assert [s.caption for s in a] == [s.caption for s in b] != [s.caption for s in c]


def test_tokenizer_round_trip(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tokenizer) > 100
    sot, eot = loaded("")["input_ids"]
    assert (sot, eot) == (len(loaded) - 2, len(loaded) - 1) and loaded.pad_token_id == eot
    assert loaded.model_max_length == 77
    ids = loaded("In the Top Left cell there is a red circle.")["input_ids"]
    assert ids[0] == sot and ids[-1] == eot and len(ids) == 13 and loaded.unk_token_id not in ids


# ------------------------------------------------------------------------------ token policy
def _change_colour(scene: tw.ToyScene, index: int) -> str:
    obj = scene.objects[index]
    start, end = scene.sentence_spans[index]
    other = next(c for c in tw.COLOURS if c != obj.colour)
    return scene.caption[:start] + scene.caption[start:end].replace(obj.colour, other) + scene.caption[end:]


def test_fact_after_token_77_reaches_segment_encoding_only(scenes, tokenizer):
    from transformers import CLIPTextModel

    from longalign.text_encoding import SegmentCLIPEncoder

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(toy_clip_config(tokenizer).text_config).eval()
    plain = PlainPromptEncoder(tokenizer, text_encoder)
    segment = SegmentCLIPEncoder(tokenizer, text_encoder, token_length=240)
    checked = {"before": 0, "after": 0}
    for scene in scenes[:12]:
        for index, (_, _, where) in enumerate(tw.sentence_positions(scene, tokenizer)):
            if where == "straddles" or checked[where] >= 3:
                continue
            changed = _change_colour(scene, index)
            with torch.no_grad():
                plain_a, plain_b = plain([scene.caption]), plain([changed])
                segment_a, segment_b = segment([scene.caption])[0], segment([changed])[0]
            assert plain_a.shape == (1, 77, tw_width(text_encoder)) and segment_a.shape[1] == 240
            if where == "after":
                assert torch.equal(plain_a, plain_b), "a fact after token 77 leaked into the truncated encoding"
            else:
                assert not torch.equal(plain_a, plain_b)
            assert (segment_a - segment_b).abs().max() > 1e-3, "the segment encoding missed a changed fact"
            checked[where] += 1
    assert checked == {"before": 3, "after": 3}


def tw_width(text_encoder) -> int:
    return text_encoder.config.hidden_size


# ------------------------------------------------------------------------------ sampler
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_oracle_model_sampler_round_trip(prediction_type, guidance_scale):
    from diffusers import DDPMScheduler

    from longalign.tiny import SD15_SCHEDULER

    scheduler = DDPMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": prediction_type})
    alphas = scheduler.alphas_cumprod
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(3, 5, 16)

    def oracle(latents, timesteps, ctx):
        a = alphas[timesteps].float().view(-1, 1, 1, 1)
        target = torch.cat([x0] * (latents.shape[0] // x0.shape[0]))
        eps = (latents - a.sqrt() * target) / (1 - a).sqrt()
        return eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * target

    out = ddim_sample(oracle, context, context.clone(), alphas, prediction_type, (4, 8, 8), steps=10,
                      guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.allclose(out, x0, atol=1e-4), (out - x0).abs().max()
    wrong = ddim_sample(lambda x, t, c: torch.zeros_like(x), context, None, alphas, prediction_type, (4, 8, 8), steps=10)
    assert (wrong - x0).abs().max() > 0.5


# ------------------------------------------------------------------------------ make + stages
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    run([sys.executable, "-m", "longalign.toyworld", "make", str(root), "--n", "12", "--n_eval", "4",
         "--clip_steps", "0", "--vae_steps", "0"], ROOT)  # fmt: skip
    return root


def test_make_writes_data_and_model_folders(world):
    from transformers import AutoTokenizer

    from longalign.reward import load_preference_model
    from longalign.text_encoding import LongPromptEncoder

    rows = [json.loads(line) for line in (world / "data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]) == {"path", "caption"} and (world / "data" / rows[0]["path"]).is_file()
    assert len(tw.read_scenes(world / "data" / "eval_scenes.jsonl")) == 4
    assert len((world / "data" / "eval_prompts.txt").read_text().splitlines()) == 4
    tokenizer = AutoTokenizer.from_pretrained(world / "sd15", subfolder="tokenizer")
    assert tokenizer("")["input_ids"] == [len(tokenizer) - 2, len(tokenizer) - 1]
    encoder = LongPromptEncoder.from_pretrained(str(world / "sd15"), str(world / "t5"), str(world / "adapter"))
    context, reports = encoder([rows[0]["caption"]])
    assert context.shape == (1, 480, 64) and reports[0].tokens_dropped == 0
    preference = load_preference_model(str(world / "preference"))
    assert preference.embed_images(torch.rand(2, 3, 32, 32)).shape == (2, 64)
    assert json.loads((world / "sd15" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_stage_and_sample_run_unchanged_on_the_toy_world(world, tmp_path):
    flags = [
        "--pretrained_model", str(world / "sd15"), "--t5_model", str(world / "t5"),
        "--dataset", str(world / "data" / "train.jsonl"), "--resolution", "32", "--train_batch_size", "2",
        "--max_train_steps", "1", "--mixed_precision", "no", "--dataloader_num_workers", "0", "--lr_warmup_steps", "1",
        "--validation_prompts", "A red circle sits in the centre cell.", "--validation_steps", "0", "--report_to", "none",
    ]  # fmt: skip
    run(["bash", str(ROOT / "run_unet.sh"), "align", "toy", *flags, "--adapter", str(world / "adapter")], tmp_path)
    final = tmp_path / "runs" / "align-toy" / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    out = tmp_path / "samples"
    run([sys.executable, str(ROOT / "sample.py"), "--pretrained_model", str(world / "sd15"), "--t5_model", str(world / "t5"),
         "--init_from", str(final), "--prompt_file", str(world / "data" / "eval_prompts.txt"), "--height", "32",
         "--width", "32", "--steps", "2", "--out", str(out)], tmp_path)  # fmt: skip
    assert len(list(out.glob("*.png"))) == 4


def test_make_refuses_bad_input(tmp_path):
    result = run([sys.executable, "-m", "longalign.toyworld", "make", str(tmp_path / "x"), "--n", "0"], ROOT, check=False)
    assert result.returncode == 2 and "--n must be at least 1" in result.stdout and "Traceback" not in result.stdout


# ------------------------------------------------------------------------------ toy CLIP (medium, ~2 min)
def test_toy_clip_reproduces_the_decomposition_claim(tokenizer, tmp_path):
    """Paper §4.2 / Fig. 2 / Table 1 on the toy world: a CLIP trained contrastively on object
    sentences, scoring long captions at segment level, has a large common direction (eta > 0.8);
    removing it (text-relevant part) lifts R@1 far above the plain embedding's, and the
    text-irrelevant part scores paired and unpaired images alike."""
    from longalign.analyze_preference import recall_at_1
    from longalign.reward import common_direction, decompose, load_preference_model
    from longalign.toyworld_models import train_toy_clip

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread is several times faster than two
    try:
        clip = train_toy_clip(tw.sample_scenes(2048, seed=0), tokenizer, steps=450, seed=0)
    finally:
        torch.set_num_threads(threads)
    clip.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    preference = load_preference_model(str(tmp_path))
    held_out = tw.sample_scenes(128, seed=1)
    with torch.no_grad():
        images = preference.embed_images(torch.stack([tw.render(s) for s in held_out]), random_crop=False)
        texts = preference.embed_texts([s.caption for s in held_out], mode="segment")
    parts = decompose(texts, common_direction(texts))
    assert parts.eta.mean() > 0.8
    plain, relevant = recall_at_1(images, texts), recall_at_1(images, parts.text_relevant)
    assert relevant > plain + 0.4 and relevant > 0.5, (plain, relevant)
    unpaired = torch.roll(torch.arange(len(held_out)), -1)
    gap = {
        name: ((images * part).sum(-1) - (images * part[unpaired]).sum(-1)).mean().item()
        for name, part in (("relevant", parts.text_relevant), ("irrelevant", parts.text_irrelevant))
    }
    assert gap["relevant"] > 0.02 and abs(gap["irrelevant"]) < 0.25 * gap["relevant"], gap
