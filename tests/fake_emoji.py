"""A small fake ``emoji-datasource-google`` package layout (emoji.json + 64×64 PNGs) for tests without npm."""

import json

import numpy as np
from PIL import Image

from latentdiff import emoji


def heldout_codes(count: int, heldout: bool) -> list[str]:
    """Code points whose emoji the fixed hash puts in (or out of) the held-out split."""
    codes = (f"1F{i:03X}" for i in range(0x300, 0xFFF))
    return [code for code in codes if emoji.is_heldout(code) == heldout][:count]


def write_png(path, color, alpha=255):
    """A 64×64 RGBA emoji: a coloured square in the middle, fully transparent around it."""
    pixels = np.zeros((64, 64, 4), np.uint8)
    pixels[16:48, 16:48] = (*color, alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGBA").save(path)


def make_fake_package(package):
    """Writes the layout under ``package``: 4 training images (one half-transparent, skin-tone variants, one
    variant's file missing), 1 held-out image, 1 emoji without a Google image. Returns ``package``."""
    apple, santa, ghost = heldout_codes(3, heldout=False)
    (secret,) = heldout_codes(1, heldout=True)
    entries = [
        dict(name="RED APPLE", unified=apple, image=f"{apple.lower()}.png", category="Food & Drink",
             subcategory="food-fruit", has_img_google=True),
        dict(name="FATHER CHRISTMAS", unified=santa, image=f"{santa.lower()}.png", category="People & Body",
             subcategory="person-fantasy", has_img_google=True, skin_variations={
                 "1F3FF": dict(image=f"{santa.lower()}-1f3ff.png", has_img_google=True),
                 "1F3FB-1F3FE": dict(image=f"{santa.lower()}-1f3fb-1f3fe.png", has_img_google=True),
                 "1F3FC": dict(image=f"{santa.lower()}-1f3fc.png", has_img_google=True),  # file missing
             }),
        dict(name="GHOST", unified=ghost, image=f"{ghost.lower()}.png", category="Smileys & Emotion",
             subcategory="face-costume", has_img_google=False),  # no Google image
        dict(name="Secret Flag", unified=secret, image=f"{secret.lower()}.png", category="Flags",
             subcategory="country-flag", has_img_google=True),
    ]
    package.mkdir(parents=True)
    (package / "emoji.json").write_text(json.dumps(entries))
    images = package / emoji.IMAGE_DIR
    write_png(images / f"{apple.lower()}.png", (200, 0, 0), alpha=128)
    write_png(images / f"{santa.lower()}.png", (0, 200, 0))
    write_png(images / f"{santa.lower()}-1f3ff.png", (60, 30, 0))
    write_png(images / f"{santa.lower()}-1f3fb-1f3fe.png", (250, 220, 180))
    write_png(images / f"{secret.lower()}.png", (0, 0, 200))
    return package
