"""The emoji data set: conversion of a small fake npm package layout into imagefolder + metadata.jsonl."""

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fake_emoji import make_fake_package
from PIL import Image

from latentdiff import emoji


@pytest.fixture
def fake_package(tmp_path):
    return make_fake_package(tmp_path / "package")


def read_metadata(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_captions_read_like_the_emoji():
    assert emoji.caption("RED APPLE", "food-fruit") == "red apple, fruit emoji"
    assert emoji.caption("GRINNING FACE", "face-smiling") == "grinning face, face smiling emoji"
    assert emoji.skin_tone_words("1F3FB-1F3FE") == "light and medium-dark skin tone"
    assert emoji.skin_tone_words("1F3FD-1F3FD") == "medium skin tone"
    with pytest.raises(ValueError, match="1F600"):
        emoji.skin_tone_words("1F600")


def test_heldout_is_a_fixed_five_percent():
    codes = [f"1F{i:03X}" for i in range(0x300, 0xFFF)]
    share = sum(map(emoji.is_heldout, codes)) / len(codes)
    assert 0.04 < share < 0.055  # 4.9 % of these 3327 codes (binomial sd 0.4 %)
    assert [emoji.is_heldout(c) for c in codes[:50]] == [emoji.is_heldout(c.lower()) for c in codes[:50]]


def test_convert_writes_imagefolder_with_captions(fake_package, tmp_path, caplog):
    data = emoji.convert_package(fake_package, tmp_path / "emoji")

    # apple + santa with 2 of its 3 variants in train; the hashed-out flag in test; 2 records without image.
    assert (data.num_train, data.num_heldout, data.num_missing) == (4, 1, 2)
    assert "2 emoji records have no image" in caplog.text
    train = read_metadata(data.train_dir)
    assert [r["text"] for r in train] == [
        "red apple, fruit emoji",
        "father christmas, person fantasy emoji",
        "father christmas, dark skin tone, person fantasy emoji",
        "father christmas, light and medium-dark skin tone, person fantasy emoji",
    ]
    assert train[2]["skin_tone"] == "dark skin tone" and train[2]["subcategory"] == "person-fantasy"
    test = read_metadata(data.test_dir)
    assert [r["text"] for r in test] == ["secret flag, country flag emoji"]
    assert not {r["text"] for r in test} & {r["text"] for r in train}
    # Every listed file exists in its own split, and nothing else does.
    for split, rows in ((data.train_dir, train), (data.test_dir, test)):
        assert sorted(p.name for p in split.glob("*.png")) == sorted(r["file_name"] for r in rows)


def test_images_are_rgb_on_white(fake_package, tmp_path):
    data = emoji.convert_package(fake_package, tmp_path / "emoji")
    apple = read_metadata(data.train_dir)[0]["file_name"]
    with Image.open(data.train_dir / apple) as image:
        assert image.mode == "RGB" and image.size == (64, 64)
        pixels = np.asarray(image).astype(int)
    assert (pixels[0, 0] == 255).all()  # transparent → white
    np.testing.assert_allclose(pixels[32, 32], [228, 128, 128], atol=1)  # (200, 0, 0) at alpha 128 over white
    images = emoji.load_images(data.train_dir, 64)  # what the VAE and the quality figure see: [-1, 1]
    assert tuple(images.shape) == (4, 3, 64, 64) and images[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(images[0, :, 32, 32].numpy(), pixels[32, 32] / 127.5 - 1, atol=1e-6)


def test_prepare_reuses_the_converted_data_set(fake_package, tmp_path, monkeypatch):
    root = tmp_path / "emoji"
    first = emoji.prepare_emoji_dataset(root, package=fake_package)
    # Second call: no package, no npm; it must come from the cache without touching anything.
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    mtime = (root / "train" / "metadata.jsonl").stat().st_mtime_ns
    again = emoji.prepare_emoji_dataset(root)
    assert (again.num_train, again.num_heldout, again.num_missing) == (first.num_train, 1, 2)
    assert (root / "train" / "metadata.jsonl").stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["empty info.json", "cut metadata.jsonl", "no metadata.jsonl"])
def test_a_damaged_cached_data_set_is_built_again(fake_package, tmp_path, caplog, damage):
    root = tmp_path / "emoji"
    first = emoji.prepare_emoji_dataset(root, package=fake_package)
    metadata = root / "train" / "metadata.jsonl"
    if damage == "empty info.json":
        (root / "info.json").write_text("")
    elif damage == "cut metadata.jsonl":
        metadata.write_text(metadata.read_text().splitlines()[0] + "\n")
    else:
        metadata.unlink()
    again = emoji.prepare_emoji_dataset(root, package=fake_package)
    assert "incomplete or damaged; building it again" in caplog.text
    assert len(read_metadata(again.train_dir)) == again.num_train == first.num_train


def test_missing_npm_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path))
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install npm"):
        emoji.prepare_emoji_dataset()
    assert not (tmp_path / f"emoji-google-{emoji.VERSION}").exists()


def test_npm_pack_failing_is_a_connection_error_with_npm_s_words(tmp_path, monkeypatch):
    """Offline, `npm pack` fails: an OSError (one `error:` line from the CLI) that keeps what npm said."""
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path))
    monkeypatch.setattr(emoji.shutil, "which", lambda name: "/usr/bin/npm")
    said = "npm error code EAI_AGAIN\nnpm error syscall getaddrinfo\n"
    failed = subprocess.CompletedProcess([], returncode=1, stdout="", stderr=said)
    monkeypatch.setattr(emoji.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(ConnectionError, match=r"must reach its registry once.*EAI_AGAIN npm error syscall") as error:
        emoji.prepare_emoji_dataset()
    assert "\n" not in str(error.value)  # one line


def test_npm_pack_writes_into_its_working_folder(tmp_path, monkeypatch):
    """npm < 7.18 has no --pack-destination (it would write into the user's folder): run npm in the target."""
    content = b"the package"
    monkeypatch.setattr(emoji.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(emoji, "PACKAGE_SHA1", hashlib.sha1(content).hexdigest())

    def npm_pack(args, cwd, **_):
        assert args[1:] == ["pack", f"{emoji.PACKAGE}@{emoji.VERSION}"]
        (Path(cwd) / f"{emoji.PACKAGE}-{emoji.VERSION}.tgz").write_bytes(content)
        return subprocess.CompletedProcess(args, returncode=0, stdout="", stderr="")

    monkeypatch.setattr(emoji.subprocess, "run", npm_pack)
    assert emoji.fetch_package(tmp_path / "dest").read_bytes() == content


def test_unpack_takes_only_the_data_and_refuses_escaping_paths(fake_package, tmp_path):
    tarball = tmp_path / "pkg.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(fake_package, arcname="package")
        archive.add(fake_package / "emoji.json", arcname="package/img/google/sheets/big.png")
    package = emoji.unpack_package(tarball, tmp_path / "unpacked")
    assert (package / "emoji.json").read_text() == (fake_package / "emoji.json").read_text()
    assert len(list((package / emoji.IMAGE_DIR).glob("*.png"))) == 5
    assert not (package / "img" / "google" / "sheets").exists()
    (package / "emoji.json").write_text("[{")  # cut since: unpacked again
    assert emoji.unpack_package(tarball, tmp_path / "unpacked").joinpath("emoji.json").read_text() == (
        fake_package / "emoji.json").read_text()  # fmt: skip

    evil = tmp_path / "evil.tgz"
    with tarfile.open(evil, "w:gz") as archive:
        archive.add(fake_package / "emoji.json", arcname="package/../../escaped.json")
    with pytest.raises(ValueError, match="outside the target"):
        emoji.unpack_package(evil, tmp_path / "evil")
    assert not (tmp_path.parent / "escaped.json").exists() and not (tmp_path / "evil").exists()
