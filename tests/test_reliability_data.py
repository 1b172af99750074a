"""Messy data sets: bad files are skipped and counted (or stop the run), odd images and captions train correctly.

Complements tests/test_data.py (missing columns, empty folder, a metadata line that is not JSON, to_rgb on
in-memory images), which these tests do not repeat.
"""

import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from test_data import write_caption_folder

from latentdiff.data import load_image_caption_dataset
from latentdiff.examples import ImageCaptionDataset, ImageTransform, collate_examples
from latentdiff.text import tokenize_prompts
from latentdiff.training import TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")

LONG_CAPTION = "a red square " + " ".join(["with a very long and detailed description"] * 12)  # > 77 tokens
BAD_FILES = {  # file name → the reason the summary gives
    "0.png": "truncated",
    "1.png": "empty file",
    "2.png": "not an image",
    "gone.png": "missing file",
    "huge.png": "too many pixels",
}


def messy_folder(folder: Path, long_captions: int = 0, empty_captions: int = 0) -> Path:
    """8 good PNGs (one of them 3×2 pixels, one grey-scale) with 5 bad rows (BAD_FILES); optionally some captions
    longer than 77 tokens and some empty ones. `Image.MAX_IMAGE_PIXELS` must be below 100×100 (huge.png)."""
    write_caption_folder(folder, n=11)
    data = (folder / "0.png").read_bytes()
    (folder / "0.png").write_bytes(data[: len(data) // 2])
    (folder / "1.png").write_bytes(b"")
    (folder / "2.png").write_text("this is a text file named like an image")
    Image.new("RGB", (100, 100), (0, 0, 255)).save(folder / "huge.png")
    Image.new("RGB", (3, 2), (0, 255, 0)).save(folder / "3.png")  # smaller than any resolution
    Image.new("L", (48, 40), 90).save(folder / "4.png")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows += [{"file_name": "gone.png", "text": "a missing image"}, {"file_name": "huge.png", "text": "a big one"}]
    for i in range(long_captions):
        rows[3 + i]["text"] = LONG_CAPTION
    for i in range(empty_captions):
        rows[3 + long_captions + i]["text"] = "" if i % 2 == 0 else None
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.fixture
def small_bomb_limit(monkeypatch):
    """Pillow refuses images over 2 × MAX_IMAGE_PIXELS as decompression bombs; lower the limit so a 100×100
    PNG is one (a real bomb would take hundreds of MB to build)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2500)


def test_bad_images_are_skipped_and_counted(tmp_path, small_bomb_limit, caplog):
    folder = messy_folder(tmp_path / "messy")
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        rows = load_image_caption_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "c"))
    assert len(rows) == 8
    assert sorted(rows["text"]) == sorted(f"a {c} square" for c in ["yellow", "red", "green", "blue"] * 2)
    summaries = [r.getMessage() for r in caplog.records if "Skipped" in r.getMessage()]
    assert len(summaries) == 1, summaries
    assert "Skipped 5 of 13 images" in summaries[0]
    for name, reason in BAD_FILES.items():
        assert f"{name} ({reason}" in summaries[0], (name, summaries[0])
    assert "--on_bad_image error" in summaries[0]
    # every kept row decodes and transforms
    dataset = ImageCaptionDataset(rows, ImageTransform(16), seed=0)
    assert all(dataset[i]["pixel_values"].shape == (3, 16, 16) for i in range(len(dataset)))


def test_the_other_processes_drop_the_same_images_silently(tmp_path, small_bomb_limit, caplog, capsys):
    """`verbose=False` (every process but the main one): the same rows, with no warning and no progress bar."""
    folder = messy_folder(tmp_path / "messy")
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        rows = load_image_caption_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "c"), verbose=False)
    assert len(rows) == 8 and not caplog.records and "Checking images" not in capsys.readouterr().err


def test_parts_of_the_check_add_up_to_the_whole(tmp_path, small_bomb_limit):
    """Training shares the image check out among its processes (`part` of `parts`) and pools the findings; the
    images are opened on several threads. Both must find exactly what one thread checking everything finds."""
    from latentdiff.data import drop_bad_images, find_bad_images

    folder = messy_folder(tmp_path / "messy")
    rows = load_image_caption_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "c"), check_images=False)
    assert len(rows) == 13  # nothing dropped yet
    whole = find_bad_images(rows, "image", threads=1)
    assert len(whole) == 5
    for parts in (2, 3, 13, 20):
        found = [find_bad_images(rows, "image", part, parts, threads=3) for part in range(parts)]
        assert sum(len(f) for f in found) == 5 and {k: v for f in found for k, v in f.items()} == whole, parts
    kept = drop_bad_images(rows, "image", problems=whole)
    assert len(kept) == 8 and drop_bad_images(rows, "image", problems={}) is rows  # the findings given are used


def test_bad_images_stop_with_on_bad_image_error(tmp_path, small_bomb_limit):
    folder = messy_folder(tmp_path / "messy")
    with pytest.raises(ValueError, match=r"5 of 13 images cannot be used") as error:
        load_image_caption_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "c"), on_bad_image="error")
    for name, reason in BAD_FILES.items():
        assert f"{name} ({reason}" in str(error.value)
    with pytest.raises(ValueError, match=r"on_bad_image must be 'skip' or 'error', got 'ignore'"):
        load_image_caption_dataset(train_data_dir=str(folder), on_bad_image="ignore")


def test_bad_embedded_images_are_named_by_row(tmp_path):
    """Hub-style data sets store image bytes in the table: a bad row is named by its index."""
    good = write_caption_folder(tmp_path / "good", n=2)
    table = datasets.Dataset.from_dict({
        "image": [{"bytes": (good / "0.png").read_bytes(), "path": None}, {"bytes": b"GIF89a junk", "path": None},
                  None, {"bytes": (good / "1.png").read_bytes(), "path": None}],
        "text": ["a red square", "junk", "no image", "a green square"],
    }).cast_column("image", datasets.Image())  # fmt: skip
    table.save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"2 of 4 images cannot be used: row 1 \(.*\), row 2 \(no image\)"):
        load_image_caption_dataset(dataset_name=str(tmp_path / "saved"), on_bad_image="error")
    assert load_image_caption_dataset(dataset_name=str(tmp_path / "saved"))["text"] == [
        "a red square",
        "a green square",
    ]


def test_a_folder_of_only_bad_images_is_an_error(tmp_path):
    folder = write_caption_folder(tmp_path / "bad", n=2)
    for name in ("0.png", "1.png"):
        (folder / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"None of the 2 images can be used: .*0.png \(empty file\)"):
        load_image_caption_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "c"))


# ---- every Pillow mode, from the file on disk to the training tensor ------------------------------------------


def _palette_image() -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0, 0, 0] * 254)
    return image


# (file name, image, expected RGB after compositing on white); each file is read back by Pillow and `datasets`.
MODE_CASES = [
    ("L.png", Image.new("L", (4, 4), 100), (100, 100, 100)),
    ("1.png", Image.new("1", (4, 4), 1), (255, 255, 255)),
    ("LA-opaque.png", Image.new("LA", (4, 4), (100, 255)), (100, 100, 100)),
    ("LA-half.png", Image.new("LA", (4, 4), (0, 128)), (127, 127, 127)),  # 0·128/255 + 255·127/255
    ("P.png", _palette_image(), (200, 30, 30)),
    ("P-transparent.png", _palette_image(), (255, 255, 255)),  # saved with its index 1 transparent
    ("RGBA-half.png", Image.new("RGBA", (4, 4), (255, 0, 0, 128)), (255, 127, 127)),
    ("RGBA-clear.png", Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (255, 255, 255)),
    ("CMYK.jpg", Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    ("CMYK.tif", Image.new("CMYK", (4, 4), (0, 0, 255, 0)), (255, 255, 0)),
    ("I16.png", Image.fromarray(np.full((4, 4), 32896, np.uint16)), (128, 128, 128)),  # 32896 = 128 × 257
    ("I16-white.png", Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255, 255, 255)),
]


def test_every_pillow_mode_becomes_the_right_rgb(tmp_path):
    folder = tmp_path / "modes"
    folder.mkdir()
    for name, image, _ in MODE_CASES:
        image.save(folder / name, **({"transparency": 1} if name == "P-transparent.png" else {}))
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": n, "text": n}) + "\n" for n, *_ in MODE_CASES)
    )
    rows = load_image_caption_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "c"), on_bad_image="error")
    modes = {row["text"]: row["image"].mode for row in rows}
    assert modes["I16.png"].startswith("I") and modes["CMYK.jpg"] == "CMYK" and modes["P-transparent.png"] == "P"
    dataset = ImageCaptionDataset(rows, ImageTransform(4, center_crop=True), seed=0)
    expected = {name: rgb for name, _, rgb in MODE_CASES}
    for i in range(len(dataset)):
        example = dataset[i]
        pixels = ((example["pixel_values"] + 1) * 127.5).round()  # (3, 4, 4) back in 0..255
        tolerance = 3 if example["caption"].endswith(".jpg") else 1  # JPEG is lossy
        for channel, value in enumerate(expected[example["caption"]]):
            assert (pixels[channel] - value).abs().max() <= tolerance, (example["caption"], pixels[:, 0, 0])


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (1, 40), (40, 1)])
def test_images_smaller_than_the_resolution_are_upscaled(size):
    image = Image.new("RGB", size, (0, 255, 0))
    for center_crop in (True, False):
        pixels = ImageTransform(16, center_crop=center_crop)(image, np.random.default_rng(0))
        assert pixels.shape == (3, 16, 16)
        expected = torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 16, 16)
        torch.testing.assert_close(pixels, expected)


# ---- captions ------------------------------------------------------------------------------------------------


def test_empty_non_ascii_and_long_captions_tokenize(tmp_path, clip_tokenizer, caplog):
    folder = write_caption_folder(tmp_path / "captions", n=6)
    captions = ["", None, "café crème brûlée", "一只猫 🍎", LONG_CAPTION, "a cat"]
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({**row, "text": caption}) + "\n" for row, caption in zip(rows, captions))
    )
    loaded = load_image_caption_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "c"))
    dataset = ImageCaptionDataset(loaded, ImageTransform(8), seed=0)
    examples = [dataset[i] for i in range(len(dataset))]
    with caplog.at_level(logging.WARNING):
        batch = collate_examples(examples, clip_tokenizer)
    assert batch["input_ids"].shape == (6, 77)
    by_caption = {e["caption"]: ids for e, ids in zip(examples, batch["input_ids"])}
    assert torch.equal(by_caption[""], tokenize_prompts(clip_tokenizer, [""])[0])  # the unconditional prompt
    assert "caf" in clip_tokenizer.decode(by_caption["café crème brûlée"], skip_special_tokens=True)
    assert by_caption[LONG_CAPTION][-1] == clip_tokenizer.eos_token_id  # cut to 77, still ends with EOS
    assert not [r for r in caplog.records if "longer than" in r.getMessage()]  # counted once per run, not per batch


def test_non_utf8_text_files_are_named_with_the_line(tmp_path):
    folder = write_caption_folder(tmp_path / "latin1", n=3)
    (folder / "metadata.jsonl").write_bytes(
        '{"file_name": "0.png", "text": "a red square"}\n{"file_name": "1.png", "text": "caf\xe9"}\n'.encode("latin-1")
    )
    with pytest.raises(ValueError, match=r"metadata.jsonl, line 2, is not UTF-8 .*byte 35.*save it as UTF-8"):
        load_image_caption_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "c"))
    (tmp_path / "captions.csv").write_bytes(
        "image,text\nlatin1/0.png,a red square\nlatin1/1.png,caf\xe9\n".encode("latin-1")
    )
    with pytest.raises(ValueError, match=r"captions.csv, line 3, is not UTF-8"):
        load_image_caption_dataset(dataset_name=str(tmp_path / "captions.csv"), cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize(
    "captions, message",
    [
        ([b"caf\xe9", b"tea"], r"caption column 'text' .* holds Value\('binary'\), not text"),
        ([3, 4], r"caption column 'text' .* holds Value\('int64'\), not text"),
    ],
)
def test_caption_column_that_is_not_text_is_refused_before_training(tmp_path, captions, message):
    good = write_caption_folder(tmp_path / "good", n=2)
    table = datasets.Dataset.from_dict({"image": [str(good / "0.png"), str(good / "1.png")], "text": captions})
    table.cast_column("image", datasets.Image()).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match=message):
        load_image_caption_dataset(dataset_name=str(tmp_path / "saved"))


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"file_name": "0.png", "text": "a"}', "[1, 2]"], r"metadata.jsonl, line 2, is not a JSON object with a "
                                                            r"'file_name'"),
        (['{"file_name": "0.png", "text": "a"}', '{"text": "b"}'], r"metadata.jsonl, line 2, is not a JSON object"),
        (['{"file_name": "0.png", "text": "a"}', '{"file_name": "1.png", "text": 4}'],
         r"metadata.jsonl: 'text' is a string on line 1 but a number on line 2"),
        (['{"file_name": "0.png", "text": null}', '{"file_name": "1.png", "text": ["a", "b"]}',
          '{"file_name": "2.png", "text": "c"}'],
         r"metadata.jsonl: 'text' is a list on line 2 but a string on line 3. .*one-element list"),
    ],
)  # fmt: skip
def test_malformed_metadata_lines_are_named(tmp_path, lines, message):
    folder = write_caption_folder(tmp_path / "meta", n=2)
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load_image_caption_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "c"))


def test_images_without_a_caption_line_are_counted(tmp_path, caplog):
    folder = write_caption_folder(tmp_path / "extra", n=3)
    for name in ("extra-a.png", "extra-b.jpg"):
        Image.new("RGB", (8, 8)).save(folder / name)
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        rows = load_image_caption_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "c"))
    assert len(rows) == 3
    (message,) = [r.getMessage() for r in caplog.records if "no line in" in r.getMessage()]
    assert "2 images" in message and "extra-a.png" in message


# ---- all of it in one training run -----------------------------------------------------------------------------


def test_a_messy_folder_trains_and_says_so_once(tiny_pipeline_path, tmp_path, small_bomb_limit, caplog):
    """Bad files, tiny and grey images, empty and over-long captions: the run trains on the 8 good rows and
    reports the skipped files and the cut captions once each (not once per batch)."""
    folder = messy_folder(tmp_path / "messy", long_captions=3, empty_captions=2)
    config = TrainConfig(
        pretrained_model_name_or_path=str(tiny_pipeline_path), train_data_dir=str(folder),
        output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "c"), resolution=32, train_batch_size=2,
        max_train_steps=4, lr_warmup_steps=0, seed=0, report_to="none", checkpointing_steps=1000,
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        train(config)
    messages = [record.getMessage() for record in caplog.records]
    assert len([m for m in messages if "Skipped 5 of 13 images" in m]) == 1, messages
    (long,) = [m for m in messages if "longer than 77 tokens" in m]
    assert "3 of 8 captions" in long
    assert (tmp_path / "out" / "model_index.json").is_file()
