"""The demo's picture: generated images next to the real emoji their prompts describe, with the prompts."""

import textwrap

from PIL import Image, ImageDraw, ImageFont

TILE = 96  # pixels per image (small emoji are enlarged with nearest-neighbour, so pixels stay visible)
CAPTION_LINES = 3
CAPTION_WIDTH = 15  # characters per caption line
PAD = 6


def labelled_grid(sections: list[tuple[str, list[str], list[Image.Image], list[Image.Image]]]) -> Image.Image:
    r"""One block per section: a title, then for each prompt its generated image above its real image and the
    prompt under both.

    Args:
        sections (`list[tuple]`): `(title, prompts, generated, real)` per block; `generated` and `real` hold one
            image per prompt (any size, shown at `TILE`×`TILE`).
    """
    if not sections or not all(prompts for _, prompts, _, _ in sections):
        raise ValueError("A grid needs at least one section, each with at least one prompt.")
    font = ImageFont.load_default(size=11)
    title_font = ImageFont.load_default(size=14)
    line_height = 13
    columns = max(len(prompts) for _, prompts, _, _ in sections)
    label_width = 74
    block_height = 24 + 2 * TILE + PAD + CAPTION_LINES * line_height + 2 * PAD
    width = label_width + columns * (TILE + PAD) + PAD
    canvas = Image.new("RGB", (width, len(sections) * block_height), "white")
    draw = ImageDraw.Draw(canvas)
    for s, (title, prompts, generated, real) in enumerate(sections):
        if not len(prompts) == len(generated) == len(real):
            raise ValueError(
                f"Section {title!r}: {len(prompts)} prompts, {len(generated)} generated, {len(real)} real images."
            )
        top = s * block_height
        draw.text((PAD, top + 4), title, fill="black", font=title_font)
        rows_top = top + 24
        draw.text((PAD, rows_top + TILE // 2 - 6), "generated", fill="black", font=font)
        draw.text((PAD, rows_top + TILE + TILE // 2 - 6), "real emoji", fill="gray", font=font)
        for c, (prompt, fake, true) in enumerate(zip(prompts, generated, real)):
            left = label_width + c * (TILE + PAD)
            canvas.paste(_tile(fake), (left, rows_top))
            canvas.paste(_tile(true), (left, rows_top + TILE))
            lines = textwrap.wrap(prompt, CAPTION_WIDTH)[:CAPTION_LINES]
            for i, line in enumerate(lines):
                draw.text((left, rows_top + 2 * TILE + PAD + i * line_height), line, fill="black", font=font)
    return canvas


def _tile(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST)
