"""Rows of an image-caption data set (from `load_image_caption_dataset`) as training examples and batches.

An example is the row's image as RGB (transparency composited on white), shorter side resized to the resolution,
center or random crop, random flip, scaled to [-1, 1]; one caption drawn when a row holds several; the empty
caption with probability `caption_dropout`. Every random draw is a function of (seed, epoch, row) only (the order
of the rows, of (seed, epoch)), never of which process, worker or earlier batch made it, so all processes agree on
an epoch and a run resumed from a checkpoint gets exactly the examples the uninterrupted run would have had.
"""

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from .text import tokenize_prompts

WHITE = (255, 255, 255)
# torchvision's InterpolationMode names (diffusers' --image_interpolation_mode) → the Pillow filter its Resize uses
# for a PIL image; "nearest_exact" is Pillow's NEAREST, which already samples at pixel centres.
RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


# 1. Transforms


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as RGB: transparency composited on white, 16/32-bit grey scaled down to 8 bits."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        grey = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba)
    return image.convert("RGB")


@dataclass
class ImageTransform:
    r"""Resize the shorter side to `resolution`, crop a square, maybe flip, scale to a `(3, H, W)` tensor in [-1, 1].

    Args:
        resolution (`int`): Output height and width.
        center_crop (`bool`, defaults to `False`): Crop the center; otherwise a random square.
        random_flip (`bool`, defaults to `False`): Flip left-right with probability 1/2.
        interpolation (`str`, defaults to `"lanczos"`): The resize filter, one of `RESAMPLING` (diffusers' default).
    """

    resolution: int
    center_crop: bool = False
    random_flip: bool = False
    interpolation: str = "lanczos"

    def __post_init__(self) -> None:
        if self.interpolation not in RESAMPLING:
            raise ValueError(
                f"Unknown image interpolation mode {self.interpolation!r}: use one of {', '.join(RESAMPLING)}."
            )

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        crop_u, crop_v, flip_u = rng.random(3)  # always drawn, so a setting never shifts later draws
        image = to_rgb(image)
        short = min(image.size)
        # the sizes and offsets torchvision's Resize, CenterCrop and RandomCrop (diffusers' transforms) give
        width, height = (int(self.resolution * side / short) for side in image.size)  # the short side: resolution
        image = image.resize((width, height), RESAMPLING[self.interpolation])
        extra_x, extra_y = width - self.resolution, height - self.resolution
        if self.center_crop:
            left, top = int(round(extra_x / 2)), int(round(extra_y / 2))
        else:  # each offset 0..extra equally likely
            left, top = int(crop_u * (extra_x + 1)), int(crop_v * (extra_y + 1))
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and flip_u < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3) in [-1, 1]
        return pixels.permute(2, 0, 1).contiguous()  # (3, H, W)


def pick_caption(value: object, rng: np.random.Generator, dropout: float = 0.0) -> str:
    """The caption of a row: the string, or one string of a list at random; "" with probability `dropout`."""
    choice_u, dropout_u = rng.random(2)
    if value is None:
        value = ""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) == 0:
            value = ""
        else:
            value = value[int(choice_u * len(value))]
    if not isinstance(value, str):
        raise ValueError(f"A caption must be a string or a list of strings, got {type(value).__name__}: {value!r}.")
    return "" if dropout_u < dropout else value


# 2. The torch data set and its order


def derive_seed(*keys: int) -> int:
    """A 32-bit seed that is a well-mixed function of non-negative integer `keys` (NumPy's `SeedSequence`)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


class ImageCaptionDataset(torch.utils.data.Dataset):
    r"""Rows of a `datasets.Dataset` as `{"pixel_values" | "latent_dist", "caption"}` examples.

    Args:
        dataset (`datasets.Dataset`): From `load_image_caption_dataset`.
        transform (`ImageTransform`): Image to tensor.
        seed (`int`): With the epoch (`set_epoch`) and the row, seeds each example's random choices.
        image_column / caption_column (`str`): Column names.
        caption_dropout (`float`, defaults to 0): Probability of the empty caption.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        transform: ImageTransform,
        seed: int,
        image_column: str = "image",
        caption_column: str = "text",
        caption_dropout: float = 0.0,
    ):
        self.images = dataset.select_columns([image_column])
        self.captions = dataset.select_columns([caption_column])
        self.image_column, self.caption_column = image_column, caption_column
        self.transform = transform
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.epoch = 0
        self.latent_cache: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def set_epoch(self, epoch: int) -> None:
        """New crops, flips, caption choices and dropouts each epoch, reproducible from (seed, epoch)."""
        self.epoch = epoch

    def use_latent_cache(self, latent_dists: torch.Tensor) -> None:
        """Serve row i's cached VAE latent distribution `latent_dists[i]` instead of decoding its image."""
        if len(latent_dists) != len(self):
            raise ValueError(f"The latent cache has {len(latent_dists)} rows, the data set {len(self)}.")
        self.latent_cache = latent_dists

    def image(self, index: int) -> torch.Tensor:
        """Row `index`'s transformed image, with this epoch's random choices."""
        rng = self._rngs(index)[0]
        try:
            image = self.images[index][self.image_column]
        except (OSError, ValueError, SyntaxError) as error:
            raise ValueError(f"Row {index}: the image cannot be read ({error}).") from error
        return self.transform(image, rng)

    def __getitem__(self, index: int) -> dict:
        caption_rng = self._rngs(index)[1]
        example = {}
        if self.latent_cache is not None:
            example["latent_dist"] = self.latent_cache[index]
        else:
            example["pixel_values"] = self.image(index)
        caption = self.captions[index][self.caption_column]
        try:
            example["caption"] = pick_caption(caption, caption_rng, self.caption_dropout)
        except ValueError as error:
            raise ValueError(f"Row {index}, column {self.caption_column!r}: {error}") from None
        return example

    def _rngs(self, index: int) -> list[np.random.Generator]:
        return np.random.default_rng([self.seed, self.epoch, index]).spawn(2)  # [image, caption]


class EpochShuffler(torch.utils.data.Sampler[int]):
    r"""A random order of the rows that is a function of (seed, epoch) only.

    Every process draws the same order (Accelerate then gives each its own batches of it), and a resumed run
    draws the order the interrupted one had; Accelerate's data loader calls `set_epoch`.

    Args:
        num_rows (`int`): Size of the data set.
        seed (`int`): Seed of the orders.
    """

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed, self.epoch = num_rows, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.num_rows, generator=generator).tolist())


# 3. Batches


def collate_examples(examples: list[dict], tokenizer: PreTrainedTokenizerBase) -> dict:
    """Stack examples into a batch and tokenize the captions (`input_ids` `(B, 77)`), cutting long ones quietly:
    `warn_long_captions` reports them once per run."""
    batch = {"input_ids": tokenize_prompts(tokenizer, [e["caption"] for e in examples], warn_if_cut=False)}
    for key in ("pixel_values", "latent_dist"):
        if key in examples[0]:
            batch[key] = torch.stack([e[key] for e in examples]).contiguous()  # (B, C, H, W)
    return batch


def make_collate_fn(tokenizer: PreTrainedTokenizerBase) -> functools.partial:
    """A picklable `collate_fn` for `DataLoader` (workers get a copy of the tokenizer)."""
    return functools.partial(collate_examples, tokenizer=tokenizer)
