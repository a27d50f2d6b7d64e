"""Data pipeline: caption tables, transforms, bad-row accounting, resumable sampler (METHOD.md §6)."""

import csv
import json
import logging

import pytest
import torch
from PIL import Image

from longalign.data import (
    BadRow,
    BadRowMonitor,
    DataSettings,
    LongCaptionImageDataset,
    ResumableSampler,
    build_train_dataset,
    collate_examples,
    load_caption_table,
    make_dataloader,
    normalize_caption,
    prepare_image,
    resolve_image_root,
    write_tiny_dataset,
)
from longalign.loading import UserError
from longalign.text_encoding import split_legacy


def settings_for(path, tmp_path, **kwargs):
    return DataSettings(dataset=str(path), resolution=32, cache_dir=str(tmp_path / "hf_cache"), **kwargs)


def drain(loader, monitor=None, sampler=None, limit=None):
    """Indices of the good rows of every batch; advances the sampler as the training loop does."""
    seen = []
    for number, batch in enumerate(loader):
        if limit is not None and number == limit:
            break
        if monitor is not None:
            monitor.update(batch)
        if sampler is not None:
            sampler.advance(batch["num_rows"])
        seen.append(batch["index"].tolist())
    return seen


# ------------------------------------------------------------------------------ tables
def test_jsonl_table_and_dataset(tmp_path):
    table_path = write_tiny_dataset(tmp_path / "d", n=4, resolution=32)
    settings = settings_for(table_path, tmp_path)
    table = load_caption_table(settings)
    assert table.column_names == ["path", "caption"] and len(table) == 4
    assert "\n\n" in table[0]["caption"]  # raw: paragraphs kept until a row is read
    assert resolve_image_root(settings) == str(table_path.parent)
    dataset = build_train_dataset(settings)
    example = dataset[0]
    assert example["index"] == 0
    paragraphs = [" ".join(p.split()) for p in table[0]["caption"].split("\n\n")]
    assert example["caption"] == "\n\n".join(paragraphs)  # paragraphs kept, whitespace collapsed
    assert len(example["caption"].split()) > 77  # long captions are kept whole
    pixels = example["pixel_values"]
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels.std() > 0.1  # an actual picture, not a constant
    cropped = build_train_dataset(settings_for(table_path, tmp_path, center_crop=False, random_flip=True))
    assert torch.equal(cropped[0]["pixel_values"], cropped[0]["pixel_values"])  # seeded by (augment_seed, index)


def test_csv_with_renamed_columns_and_image_root(tmp_path):
    table_path = write_tiny_dataset(tmp_path / "d", n=3, resolution=32)
    rows = [json.loads(line) for line in table_path.read_text().splitlines()]
    csv_path = tmp_path / "elsewhere" / "pairs.csv"
    csv_path.parent.mkdir()
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text", "extra"])
        for row in rows:
            writer.writerow([row["path"], row["caption"], "x"])
    settings = settings_for(
        csv_path, tmp_path, image_column="file_name", caption_column="text", image_root=str(table_path.parent)
    )
    table = load_caption_table(settings)
    assert table.column_names == ["path", "caption"]
    assert table["caption"] == [row["caption"] for row in rows]  # multi-paragraph fields survive CSV quoting
    dataset = build_train_dataset(settings)
    assert [dataset[i]["caption"] for i in range(3)] == [normalize_caption(row["caption"]) for row in rows]


def test_image_folder_with_txt_captions(tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 32), (255, 0, 0)).save(folder / "a.png")
    (folder / "a.txt").write_text("First paragraph.\n\n  Second   paragraph.\n")
    Image.new("RGB", (32, 48), (0, 0, 255)).save(folder / "sub" / "b.jpg")
    (folder / "sub" / "b.txt").write_text("A blue picture.")
    Image.new("RGB", (32, 32)).save(folder / "no_caption.png")
    Image.new("RGB", (32, 32)).save(folder / "latin1.png")
    (folder / "latin1.txt").write_bytes(b"Un caf\xe9")  # not UTF-8: a bad caption row, not a crash
    settings = settings_for(folder, tmp_path)
    table = load_caption_table(settings)
    assert table["path"] == ["a.png", "latin1.png", "sub/b.jpg"] and table["caption"][1] is None
    # --split holds rows out of a folder as of a table (the folder is the split 'train')
    assert load_caption_table(settings_for(folder, tmp_path, split="train[1:]"))["path"] == ["latin1.png", "sub/b.jpg"]
    assert load_caption_table(settings_for(folder, tmp_path, split="train[:1]+train[2:]"))["path"] == ["a.png", "sub/b.jpg"]
    with pytest.raises(UserError, match=r"--split 'test' does not fit the image folder .*Unknown split"):
        load_caption_table(settings_for(folder, tmp_path, split="test"))
    dataset = build_train_dataset(settings)
    red, bad, blue = dataset[0], dataset[1], dataset[2]
    assert bad.reason == "bad_caption" and bad.detail == "row 1 (latin1.png): caption None"  # named by its file
    assert red["caption"] == "First paragraph.\n\nSecond paragraph."
    # pure red -> channel 0 at +1, the others at -1; JPEG blue within a small tolerance
    assert torch.allclose(red["pixel_values"][:, 16, 16], torch.tensor([1.0, -1.0, -1.0]))
    assert blue["pixel_values"][2].mean() > 0.9 and blue["pixel_values"][0].mean() < -0.9


def test_table_errors(tmp_path):
    with pytest.raises(UserError, match="not an existing file"):
        load_caption_table(settings_for(tmp_path / "nope.jsonl", tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "text": "x"}) + "\n")
    with pytest.raises(UserError, match=r"no column\(s\) 'path', 'caption'; columns found: 'image', 'text'"):
        load_caption_table(settings_for(bad, tmp_path))
    prompts_only = tmp_path / "prompts.jsonl"  # the reward stages need captions only
    prompts_only.write_text(json.dumps({"caption": "A red door."}) + "\n" + json.dumps({"caption": "A blue sky."}) + "\n")
    assert load_caption_table(settings_for(prompts_only, tmp_path), with_images=False)["caption"] == ["A red door.", "A blue sky."]
    with pytest.raises(UserError, match=r"no column\(s\) 'path'"):
        load_caption_table(settings_for(prompts_only, tmp_path))
    with pytest.raises(UserError, match="--image_column and --caption_column are both 'caption'"):
        load_caption_table(DataSettings(dataset=str(prompts_only), image_column="caption"))
    (tmp_path / "zero.jsonl").write_text("")
    with pytest.raises(UserError, match="is an empty file"):
        load_caption_table(settings_for(tmp_path / "zero.jsonl", tmp_path))
    empty = tmp_path / "empty.csv"
    empty.write_text("path,caption\n")
    with pytest.raises(UserError, match="no rows"):
        load_caption_table(settings_for(empty, tmp_path))
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(UserError, match="no images with a .txt caption"):
        load_caption_table(settings_for(tmp_path / "empty_folder", tmp_path))
    with pytest.raises(UserError, match="--image_root is required"):
        resolve_image_root(DataSettings(dataset="luping-liu/LongAlign"))
    with pytest.raises(UserError, match="could not read dataset 'luping-liu/LongAlign'.*local file"):
        load_caption_table(settings_for("luping-liu/LongAlign", tmp_path))  # offline in tests
    with pytest.raises(UserError, match="not an existing file or folder"):
        load_caption_table(settings_for("./no/such/thing", tmp_path))
    with pytest.raises(UserError, match="resolution"):
        DataSettings(dataset="x.jsonl", resolution=0)


def test_wrong_image_root_fails_fast(tmp_path):
    table_path = write_tiny_dataset(tmp_path / "d", n=4, resolution=32)
    settings = settings_for(table_path, tmp_path, image_root=str(tmp_path))
    with pytest.raises(UserError, match="4 of the first 4 images are missing.*check --image_root"):
        build_train_dataset(settings)


# -------------------------------------------------------------------------- transforms
def test_prepare_image_resize_crop_flip():
    # left half black, right half white, 96x48 -> shorter side 32 -> 64x32 -> center crop 32x32
    image = Image.new("RGB", (96, 48), (0, 0, 0))
    image.paste((255, 255, 255), (48, 0, 96, 48))
    centered = prepare_image(image, DataSettings(dataset="x.jsonl", resolution=32))
    assert centered.shape == (3, 32, 32)
    assert centered.min() >= -1 and centered.max() <= 1
    assert torch.allclose(centered[:, :, 0], torch.full((3, 32), -1.0))  # left edge of the crop: black
    assert torch.allclose(centered[:, :, -1], torch.full((3, 32), 1.0))  # right edge: white
    flipped = prepare_image(
        image, DataSettings(dataset="x.jsonl", resolution=32, random_flip=True), torch.Generator().manual_seed(1)
    )
    unflipped = prepare_image(
        image, DataSettings(dataset="x.jsonl", resolution=32, random_flip=True), torch.Generator().manual_seed(0)
    )
    flips = {bool(torch.equal(t, centered.flip(-1))) for t in (flipped, unflipped)}
    assert flips == {True, False}  # seed 0 and seed 1 draw different flips; same crop otherwise
    random_settings = DataSettings(dataset="x.jsonl", resolution=32, center_crop=False)
    crops = [prepare_image(image, random_settings, torch.Generator().manual_seed(s)) for s in range(6)]
    assert all(c.shape == (3, 32, 32) for c in crops)
    assert len({round(float(c.mean()), 4) for c in crops}) > 1  # crop position varies with the seed
    again = prepare_image(image, random_settings, torch.Generator().manual_seed(3))
    assert torch.equal(again, crops[3])


def test_prepare_image_equals_the_released_transform():
    """The released training transform: Resize(R, bilinear), CenterCrop(R), ToTensor, Normalize(0.5, 0.5)."""
    from torchvision import transforms

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (61, 97, 3), generator=generator, dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    released = transforms.Compose(
        [
            transforms.Resize(32, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )
    ours = prepare_image(image, DataSettings(dataset="x.jsonl", resolution=32))
    torch.testing.assert_close(ours, released(image), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- bad rows
def test_bad_rows_skipped_and_counted_across_workers(tmp_path, caplog):
    table_path = write_tiny_dataset(tmp_path / "d", n=6, resolution=32, broken_image=True, missing_image=True)
    with open(table_path, "a") as handle:
        handle.write(json.dumps({"path": "images/0000_x.png", "caption": ""}) + "\n")
        handle.write(json.dumps({"path": "images/0001_x.png", "caption": None}) + "\n")
    settings = settings_for(table_path, tmp_path, max_bad_fraction=0.5)
    dataset = build_train_dataset(settings)  # 4 bad of 10 rows, first 6 fine: passes the fail-fast check
    assert len(dataset) == 10
    sampler = ResumableSampler(len(dataset), seed=0)
    loader = make_dataloader(dataset, sampler, batch_size=4, num_workers=1)
    monitor = BadRowMonitor.from_settings(settings, rows_per_epoch=sampler.num_samples)
    with caplog.at_level(logging.WARNING, logger="longalign.data"):
        seen = drain(loader, monitor, sampler)
    good = sorted(index for batch in seen for index in batch)
    assert good == [0, 1, 2, 3, 4, 5]
    assert monitor.rows_seen == 10 and monitor.rows_bad == 4
    assert monitor.bad_counts == {"missing_image": 1, "unreadable_image": 1, "bad_caption": 2}
    assert sampler.position == sampler.num_samples == 10
    assert "4 of 10 rows (40.0%) were skipped" in monitor.summary()
    assert any("were skipped" in record.message for record in caplog.records)


def test_dataloader_workers_split_each_caption_into_segments(tmp_path):
    """With `split_caption`, every batch carries its captions' segments, made in the workers."""
    dataset = build_train_dataset(settings_for(write_tiny_dataset(tmp_path / "d", n=5, resolution=32), tmp_path))
    loader = make_dataloader(dataset, ResumableSampler(len(dataset), seed=0), batch_size=2, num_workers=1, split_caption=split_legacy)
    batches = list(loader)
    assert sum(len(batch["caption"]) for batch in batches) == 5
    for batch in batches:
        assert batch["segments"] == [split_legacy(caption) for caption in batch["caption"]]
        assert any(len(segments) > 1 for segments in batch["segments"])  # the tiny captions have several sentences
    assert "segments" not in next(iter(make_dataloader(dataset, ResumableSampler(len(dataset), seed=0), batch_size=2)))


def test_too_many_bad_rows_raise(tmp_path):
    table_path = write_tiny_dataset(tmp_path / "d", n=3, resolution=32, broken_image=True, missing_image=True)
    settings = settings_for(table_path, tmp_path, max_bad_fraction=0.2, min_rows_before_check=5)
    table = load_caption_table(settings)
    dataset = LongCaptionImageDataset(table, resolve_image_root(settings), settings)  # skip the fail-fast check
    sampler = ResumableSampler(len(dataset), seed=0, shuffle=False)
    loader = make_dataloader(dataset, sampler, batch_size=2)
    monitor = BadRowMonitor.from_settings(settings, rows_per_epoch=sampler.num_samples, image_root="ROOT")
    with pytest.raises(UserError) as error:
        drain(loader, monitor, sampler)
    message = str(error.value)
    assert "\n" not in message
    assert "2 of 5 rows (40.0%) were skipped: 1 missing images, 1 unreadable images" in message
    assert "check --image_root (ROOT)" in message and "does_not_exist.png" in message


def test_collate_all_bad_batch():
    batch = collate_examples([BadRow(3, "missing_image", "x")], resolution=8)
    assert batch["pixel_values"].shape == (0, 3, 8, 8) and batch["index"].shape == (0,)
    assert batch["num_rows"] == 1 and batch["caption"] == []


def test_monitor_state_roundtrip():
    monitor = BadRowMonitor(max_bad_fraction=1.0)
    monitor.update({"num_rows": 5, "bad_rows": [BadRow(1, "bad_caption", "x")]})
    restored = BadRowMonitor(max_bad_fraction=1.0)
    restored.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert restored.rows_seen == 5 and restored.rows_bad == 1
    assert restored.summary() == monitor.summary() == "1 of 5 rows (20.0%) were skipped: 1 empty or non-text captions (e.g. bad_caption: x)"
    older = {"rows_seen": 5, "bad_counts": {"bad_caption": 1}}  # a checkpoint saved before the examples were kept
    restored.load_state_dict(older)
    assert restored.summary() == "1 of 5 rows (20.0%) were skipped: 1 empty or non-text captions"


# ----------------------------------------------------------------------------- sampler
def epoch_list(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("dataset_len,drop_last", [(10, False), (11, False), (11, True)])
def test_sampler_ranks_partition_epoch(dataset_len, drop_last):
    ranks = [ResumableSampler(dataset_len, seed=5, num_replicas=2, rank=r, drop_last=drop_last) for r in range(2)]
    parts = [epoch_list(s, 0) for s in ranks]
    assert len(parts[0]) == len(parts[1]) == ranks[0].num_samples == len(ranks[0])
    union = parts[0] + parts[1]
    if drop_last:
        assert len(set(union)) == len(union) == 10  # disjoint, one row dropped
    elif dataset_len % 2 == 0:
        assert sorted(union) == list(range(dataset_len))  # an exact partition
    else:
        assert set(union) == set(range(dataset_len)) and len(union) == dataset_len + 1  # one row padded
    single = epoch_list(ResumableSampler(dataset_len, seed=5), 0)
    assert parts[0] == single[0 : 2 * len(parts[0]) : 2][: len(parts[0])]  # strided slices of one order


def test_sampler_orders_depend_on_seed_and_epoch():
    a, b = ResumableSampler(50, seed=1), ResumableSampler(50, seed=1)
    assert epoch_list(a, 0) == epoch_list(b, 0)
    assert sorted(epoch_list(a, 0)) == list(range(50))
    assert epoch_list(a, 0) != epoch_list(a, 1)
    assert epoch_list(a, 0) != epoch_list(ResumableSampler(50, seed=2), 0)
    assert epoch_list(ResumableSampler(7, shuffle=False), 3) == list(range(7))
    firsts = {tuple(epoch_list(ResumableSampler(50, seed=seed), epoch)[:5]) for seed in range(4) for epoch in range(4)}
    assert len(firsts) == 16  # every (seed, epoch) pair gives its own order


def run_indices(sampler, total_steps, batch_size=3, stop_after=None):
    """The index batches a training loop sees over `total_steps` steps, epoch after epoch."""
    batches = []
    while len(batches) < total_steps:
        order = list(sampler)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            sampler.advance(len(batch))
            batches.append(batch)
            if len(batches) in (total_steps, stop_after):
                return batches  # stops before next_epoch() even after an epoch's last batch
        sampler.next_epoch()
    return batches


@pytest.mark.parametrize("stop_after", [2, 4, 6, 7])  # mid-epoch, exactly at / across the epoch boundary
def test_sampler_resume_matches_uninterrupted(stop_after):
    # 2 ranks, 23 rows -> 12 rows per rank per epoch -> 4 batches of 3 per epoch
    total = 10
    for rank in range(2):
        reference = run_indices(ResumableSampler(23, seed=9, num_replicas=2, rank=rank), total)
        first = ResumableSampler(23, seed=9, num_replicas=2, rank=rank)
        before = run_indices(first, total, stop_after=stop_after)
        state = json.loads(json.dumps(first.state_dict()))
        assert (state["epoch"], state["position"]) == {2: (0, 6), 4: (0, 12), 6: (1, 6), 7: (1, 9)}[stop_after]
        resumed = ResumableSampler(23, seed=9, num_replicas=2, rank=rank)
        resumed.load_state_dict(state)
        after = run_indices(resumed, total - len(before))
        assert before + after == reference
        assert len(set(map(tuple, reference[:4]))) == 4 and reference[:4] != reference[4:8]


def test_sampler_resume_through_dataloader_with_workers(tmp_path):
    table_path = write_tiny_dataset(tmp_path / "d", n=7, resolution=32)
    settings = settings_for(table_path, tmp_path)
    dataset = build_train_dataset(settings)

    def run(stop=None, state=None, batches=None):
        sampler = ResumableSampler(len(dataset), seed=3)
        if state is not None:
            sampler.load_state_dict(state)
        loader = make_dataloader(dataset, sampler, batch_size=2, num_workers=1)
        out = []
        while len(out) < (batches if batches is not None else 6):
            for batch in loader:  # prefetching runs ahead of this loop; state follows consumption
                if stop is not None and len(out) == stop:
                    return out, sampler.state_dict()
                sampler.advance(batch["num_rows"])
                out.append(batch["index"].tolist())
                if len(out) == (batches if batches is not None else 6):
                    break
            else:
                sampler.next_epoch()
        return out, sampler.state_dict()

    reference, _ = run()
    before, state = run(stop=3)
    assert state["position"] == 6 and state["epoch"] == 0
    after, _ = run(state=state, batches=3)
    assert before + after == reference
    assert sorted(sum(reference[:4], [])) == list(range(7))  # 7 rows: batches of 2,2,2,1 = one epoch


def test_sampler_resume_refuses_changed_data():
    state = ResumableSampler(10, seed=1).state_dict()
    with pytest.raises(UserError, match="dataset_len=10"):
        ResumableSampler(12, seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="seed=1"):
        ResumableSampler(10, seed=2).load_state_dict(state)


def test_sampler_resume_with_other_process_count_keeps_global_progress():
    two = ResumableSampler(24, seed=1, num_replicas=2, rank=0)
    two.advance(6)  # 12 rows consumed over both ranks
    three = ResumableSampler(24, seed=1, num_replicas=3, rank=2)
    three.load_state_dict(two.state_dict())
    assert three.position == 4 and len(three) == 4
    assert list(three) == list(ResumableSampler(24, seed=1).epoch_order(0)[12 + 2 :: 3].tolist())


def test_16_bit_and_float_greyscale_keep_their_tones(tmp_path):
    """PIL's own RGB conversion clips a 16-bit PNG (mode I;16) to white and a float image to black:
    the training image would be blank while the row counted as good."""
    import numpy as np

    ramp = np.tile(np.linspace(0, 1, 64), (64, 1))  # dark on the left, bright on the right
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "grey16.png")
    eight_bit = prepare_image(Image.fromarray((ramp * 255).round().astype(np.uint8)), DataSettings(dataset="x.jsonl", resolution=32))
    settings = DataSettings(dataset="x.jsonl", resolution=32)
    with Image.open(tmp_path / "grey16.png") as sixteen:
        assert sixteen.mode.startswith("I")
        assert (prepare_image(sixteen, settings) - eight_bit).abs().max() < 0.02
    float_image = Image.fromarray(ramp.astype(np.float32), "F")
    assert (prepare_image(float_image, settings) - eight_bit).abs().max() < 0.02
    eight_bit_values = Image.fromarray((ramp * 255).round().astype(np.int32), "I")  # mode I, 8-bit range
    assert (prepare_image(eight_bit_values, settings) - eight_bit).abs().max() < 0.02
