"""Image-caption data: every source loads the same rows, transforms and random choices are right and reproducible."""

import json
from pathlib import Path

import datasets
import numpy as np
import pandas
import pytest
import torch
from PIL import Image

from latentdiff.data import load_image_caption_dataset
from latentdiff.examples import EpochShuffler, ImageCaptionDataset, ImageTransform, collate_examples, pick_caption, to_rgb

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def write_caption_folder(folder: Path, n: int = 8, size: tuple[int, int] = (48, 40)) -> Path:
    """An `imagefolder` data set: n PNGs (a colored square on its inverse) and a metadata.jsonl of captions.

    Also used by the training tests (imported from here): images are learnable from their captions.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for i in range(n):
            name, color = list(COLORS.items())[i % len(COLORS)]
            pixels = np.full((size[1], size[0], 3), color, np.uint8)
            pixels[size[1] // 4 : 3 * size[1] // 4, size[0] // 4 : 3 * size[0] // 4] = 255 - np.array(color)
            Image.fromarray(pixels).save(folder / f"{i}.png")
            metadata.write(json.dumps({"file_name": f"{i}.png", "text": f"a {name} square"}) + "\n")
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return write_caption_folder(tmp_path_factory.mktemp("data") / "images", n=6)


def _rows(dataset: datasets.Dataset) -> list[tuple[bytes, str]]:
    return [(np.asarray(row["image"].convert("RGB")).tobytes(), row["text"]) for row in dataset]


def test_imagefolder_loads(image_folder, tmp_path):
    dataset = load_image_caption_dataset(train_data_dir=str(image_folder), cache_dir=str(tmp_path))
    assert len(dataset) == 6 and set(dataset.column_names) == {"image", "text"}
    assert sorted(dataset["text"])[0] == "a blue square"
    assert dataset[0]["image"].size == (48, 40)


def test_every_source_loads_the_same_rows(tmp_path):
    image_folder = write_caption_folder(tmp_path / "images", n=6)
    reference = load_image_caption_dataset(train_data_dir=str(image_folder), cache_dir=str(tmp_path / "c0"))
    expected = sorted(_rows(reference))

    # save_to_disk folders (a DatasetDict and a bare Dataset)
    datasets.DatasetDict({"train": reference}).save_to_disk(tmp_path / "saved_dict")
    reference.save_to_disk(tmp_path / "saved")
    # csv and parquet files whose image column holds paths relative to the file
    (tmp_path / "tables").mkdir()
    metadata = [json.loads(line) for line in (image_folder / "metadata.jsonl").read_text().splitlines()]
    table = pandas.DataFrame({"image": [f"../images/{m['file_name']}" for m in metadata],
                              "text": [m["text"] for m in metadata]})  # fmt: skip
    table.to_csv(tmp_path / "tables" / "train.csv", index=False)
    table.to_parquet(tmp_path / "tables" / "train.parquet")
    # a data set repository folder (the layout of a Hub data set: parquet shards with embedded images)
    (tmp_path / "repo" / "data").mkdir(parents=True)
    reference.to_parquet(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")

    for name in ["saved_dict", "saved", "tables/train.csv", "tables/train.parquet", "repo"]:
        loaded = load_image_caption_dataset(dataset_name=str(tmp_path / name), cache_dir=str(tmp_path / "c1"))
        assert sorted(_rows(loaded)) == expected, name


def test_dataset_config_name_picks_that_config(tmp_path):
    """A data set folder with two configs in its README's YAML `configs:`, as a Hub data set declares them."""
    repo = tmp_path / "repo"
    write_caption_folder(repo / "photos", n=2)
    write_caption_folder(repo / "drawings", n=3)
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: photos\n  data_dir: photos\n  default: true\n"
                                    "- config_name: drawings\n  data_dir: drawings\n---\n")  # fmt: skip
    kwargs = dict(dataset_name=str(repo), cache_dir=str(tmp_path / "c"))
    assert sorted(load_image_caption_dataset(**kwargs)["text"]) == ["a green square", "a red square"]
    drawings = load_image_caption_dataset(**kwargs, dataset_config_name="drawings")
    assert sorted(drawings["text"]) == ["a blue square", "a green square", "a red square"]


def test_train_data_dir_with_a_dataset_name_is_the_folder_inside_it(tmp_path):
    repo = tmp_path / "repo"
    write_caption_folder(repo / "a", n=2)
    write_caption_folder(repo / "b", n=3)
    loaded = load_image_caption_dataset(dataset_name=str(repo), train_data_dir="b", cache_dir=str(tmp_path / "c"))
    assert sorted(loaded["text"]) == ["a blue square", "a green square", "a red square"]  # b's rows only


def test_max_train_samples_is_a_seeded_subset(image_folder, tmp_path):
    kwargs = dict(train_data_dir=str(image_folder), cache_dir=str(tmp_path), max_train_samples=3)
    first, again = (load_image_caption_dataset(**kwargs, seed=1)["text"] for _ in range(2))
    assert len(first) == 3 and first == again
    # a random subset, as diffusers' .shuffle(seed).select: not the file's first rows (a sorted data set would give
    # one class), and another seed draws another
    in_file_order = load_image_caption_dataset(train_data_dir=str(image_folder), cache_dir=str(tmp_path))["text"]
    subsets = {tuple(load_image_caption_dataset(**kwargs, seed=seed)["text"]) for seed in range(4)}
    assert len(subsets) > 1 and subsets != {tuple(in_file_order[:3])}


def test_max_train_samples_above_the_data_set_size_keeps_every_row(image_folder, tmp_path):
    every_row = load_image_caption_dataset(train_data_dir=str(image_folder), cache_dir=str(tmp_path))["text"]
    kept = load_image_caption_dataset(train_data_dir=str(image_folder), cache_dir=str(tmp_path), max_train_samples=1000)
    assert sorted(kept["text"]) == sorted(every_row) and len(kept) == 6


def test_missing_column_names_the_existing_ones(image_folder, tmp_path):
    with pytest.raises(
        ValueError, match=r"caption column 'caption'.*columns are \['image', 'text'\].*--caption_column"
    ):
        load_image_caption_dataset(train_data_dir=str(image_folder), caption_column="caption", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"image column 'img'.*\['image', 'text'\]"):
        load_image_caption_dataset(train_data_dir=str(image_folder), image_column="img", cache_dir=str(tmp_path))


def test_image_folder_without_captions_asks_for_metadata_jsonl(image_folder, tmp_path):
    folder = tmp_path / "no-captions"
    folder.mkdir()
    for image in image_folder.glob("*.png"):
        (folder / image.name).write_bytes(image.read_bytes())
    with pytest.raises(ValueError, match=r"no-captions holds images but no captions: add a metadata.jsonl"):
        load_image_caption_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))


def test_bad_folders_and_tables_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_image_caption_dataset(train_data_dir=str(tmp_path / "empty"))
    folder = write_caption_folder(tmp_path / "broken", n=2)
    with open(folder / "metadata.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl, line 3, is not valid JSON"):
        load_image_caption_dataset(train_data_dir=str(folder))
    (tmp_path / "t.csv").write_text("image,text\nmissing.png,a cat\n")
    with pytest.raises(FileNotFoundError, match=r"row 0: image .*missing.png does not exist"):
        load_image_caption_dataset(dataset_name=str(tmp_path / "t.csv"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match=r"no.csv does not exist: --dataset_name takes a Hub data set id"):
        load_image_caption_dataset(dataset_name=str(tmp_path / "no.csv"), cache_dir=str(tmp_path / "c"))
    (tmp_path / "t.jsonl").write_text('{"image": "missing.png", "text": "a cat"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl is a .jsonl file: it takes .* a .csv or .parquet table; .*--train_data_dir"):
        load_image_caption_dataset(dataset_name=str(tmp_path / "t.jsonl"), cache_dir=str(tmp_path / "c"))


def test_an_unreadable_data_folder_says_so(tmp_path, monkeypatch):
    """os.walk lists nothing in it, which read as "holds no images" (simulated: root reads any folder)."""
    import latentdiff.data

    folder = write_caption_folder(tmp_path / "data", n=2)
    monkeypatch.setattr(latentdiff.data.os, "access", lambda path, mode: Path(path) != folder)
    with pytest.raises(PermissionError, match=r"--train_data_dir .*data cannot be read \(permission denied\)"):
        load_image_caption_dataset(train_data_dir=str(folder))


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("RGBA", (255, 255, 255)),  # fully transparent: the white background
        ("LA", (255, 255, 255)),
        ("P", (255, 255, 255)),  # palette with a transparent index
        ("L", (128, 128, 128)),
        ("CMYK", (255, 0, 0)),
        ("I;16", (128, 128, 128)),
    ],
)
def test_to_rgb_composites_on_white_and_scales(mode, expected):
    if mode == "RGBA":
        image = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    elif mode == "LA":
        image = Image.new("LA", (2, 2), (10, 0))
    elif mode == "P":
        image = Image.new("P", (2, 2), 3)
        image.info["transparency"] = 3
    elif mode == "L":
        image = Image.new("L", (2, 2), 128)
    elif mode == "CMYK":
        image = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    else:
        image = Image.fromarray(np.full((2, 2), 128 * 257, np.uint16))
        assert image.mode.startswith("I")
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    np.testing.assert_allclose(np.asarray(rgb)[0, 0], expected, atol=1)


def test_transform_resizes_crops_flips_and_normalises():
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40] = 255  # left half white
    image = Image.fromarray(pixels)
    rng = np.random.default_rng(0)
    center = ImageTransform(20, center_crop=True, interpolation="bilinear")(image, rng)  # no ringing at the edge
    assert center.shape == (3, 20, 20) and center.dtype == torch.float32
    assert center.min() == -1.0 and center.max() == 1.0
    assert (center[:, :, :9] == 1).all() and (center[:, :, 11:] == -1).all()  # the boundary in the middle

    flip = ImageTransform(20, center_crop=True, random_flip=True, interpolation="bilinear")
    flips = [flip(image, np.random.default_rng(s)) for s in range(1000)]
    flipped = sum(torch.equal(f, center.flip(-1)) for f in flips)
    assert flipped + sum(torch.equal(f, center) for f in flips) == 1000
    assert 430 < flipped < 570  # a fair coin, as diffusers' RandomHorizontalFlip(p=0.5): about 500
    crops = {ImageTransform(20)(image, np.random.default_rng(s))[0].mean().item() for s in range(8)}
    assert len(crops) > 1  # random crops land in different places


@pytest.mark.parametrize("mode", ["lanczos", "bilinear", "bicubic", "box", "hamming", "nearest", "nearest_exact"])
def test_interpolation_modes_resize_with_pillow_s_filter(mode):
    """torchvision's Resize of a PIL image is Pillow's resize with the mode's filter (nearest_exact: NEAREST)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 45, 3), dtype=np.uint8))
    pixels = ImageTransform(20, center_crop=True, interpolation=mode)(image, np.random.default_rng(0))
    filters = {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "box": Image.BOX,
               "hamming": Image.HAMMING, "nearest": Image.NEAREST, "nearest_exact": Image.NEAREST}  # fmt: skip
    expected = np.asarray(image.resize((30, 20), filters[mode]).crop((5, 0, 25, 20)), np.float32) / 127.5 - 1
    np.testing.assert_array_equal(pixels.permute(1, 2, 0).numpy(), expected)
    assert ImageTransform(20).interpolation == "lanczos"  # diffusers' default


def test_unknown_interpolation_mode_is_named():
    with pytest.raises(ValueError, match=r"Unknown image interpolation mode 'cubic': use one of nearest, "):
        ImageTransform(20, interpolation="cubic")


def test_crop_offsets_are_torchvision_s(monkeypatch):
    """Sizes and offsets as torchvision's Resize (long side truncated), CenterCrop (offset rounded) and RandomCrop
    (every offset equally likely; rounding a uniform draw made the two edge offsets half as likely)."""
    crops = []
    record = lambda image, box: crops.append((image.size, box)) or Image.new("RGB", (4, 4))  # noqa: E731
    monkeypatch.setattr(Image.Image, "crop", record)
    center_crop = ImageTransform(4, center_crop=True)
    center_crop(Image.new("RGB", (26, 7)), np.random.default_rng(0))
    assert crops[-1] == ((14, 4), (5, 0, 9, 4))  # 26·4/7 = 14.86 → 14, not 15
    ImageTransform(256, center_crop=True)(Image.new("RGB", (196, 392)), np.random.default_rng(0))
    assert crops[-1][0] == (256, 512)  # int(256·392/196), not int(392·(256/196)) = 511
    center_crop(Image.new("RGB", (7, 4)), np.random.default_rng(0))
    assert crops[-1] == ((7, 4), (2, 0, 6, 4))  # (7 − 4) / 2 = 1.5 → 2, not 1
    random_crop = ImageTransform(4)
    for size, offset in (((6, 4), 0), ((4, 6), 1)):  # a wide image crops at random lefts, a tall one at random tops
        crops.clear()
        for seed in range(900):
            random_crop(Image.new("RGB", size), np.random.default_rng(seed))
        offsets = np.bincount([box[offset] for _, box in crops], minlength=3)
        assert len(offsets) == 3 and offsets.min() > 250, size  # offsets 0, 1, 2 about 300 times each


def test_captions_lists_and_dropout():
    rng = np.random.default_rng(0)
    for captions in (["a", "b", "c"], ("a", "b", "c"), np.array(["a", "b", "c"])):  # as lists, pandas, numpy give them
        picks = {pick_caption(captions, rng) for _ in range(50)}
        assert picks == {"a", "b", "c"} and all(isinstance(pick, str) for pick in picks)
    assert pick_caption("x", rng, dropout=1.0) == ""
    dropped = sum(pick_caption("x", rng, dropout=0.3) == "" for _ in range(2000))
    assert 450 < dropped < 750
    assert pick_caption(None, rng) == "" and pick_caption([], rng) == ""
    with pytest.raises(ValueError, match="caption must be a string"):
        pick_caption(3, rng)


def test_examples_are_a_function_of_seed_epoch_and_row(image_folder, tmp_path, clip_tokenizer):
    rows = load_image_caption_dataset(train_data_dir=str(image_folder), cache_dir=str(tmp_path))
    make = lambda seed: ImageCaptionDataset(rows, ImageTransform(16, random_flip=True), seed, caption_dropout=0.5)  # noqa: E731
    a, b = make(0), make(0)
    for epoch in (0, 1):
        a.set_epoch(epoch), b.set_epoch(epoch)
        for i in range(len(a)):
            assert torch.equal(a[i]["pixel_values"], b[i]["pixel_values"]) and a[i]["caption"] == b[i]["caption"]
    a.set_epoch(0)
    epoch0 = [a[i]["pixel_values"] for i in range(len(a))]
    a.set_epoch(1)
    assert any(not torch.equal(x, a[i]["pixel_values"]) for i, x in enumerate(epoch0))
    other_seed = make(1)  # another --seed draws other flips
    assert any(not torch.equal(x, other_seed[i]["pixel_values"]) for i, x in enumerate(epoch0))
    # the dataset applies its caption dropout: at 0.5 some captions are empty and some not, at 1.0 all
    captions = []
    for epoch in range(4):
        a.set_epoch(epoch)
        captions += [a[i]["caption"] for i in range(len(a))]
    assert "" in captions and any(captions)
    dropped = ImageCaptionDataset(rows, ImageTransform(16), 0, caption_dropout=1.0)
    assert all(dropped[i]["caption"] == "" for i in range(len(dropped)))

    batch = collate_examples([a[0], a[1]], clip_tokenizer)
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["input_ids"].shape == (2, 77)
    assert batch["input_ids"][0].tolist() == clip_tokenizer(a[0]["caption"], padding="max_length").input_ids


def test_epoch_shuffler_is_a_function_of_seed_and_epoch():
    sampler = EpochShuffler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(EpochShuffler(10, seed=4)) != first  # another --seed, another order
