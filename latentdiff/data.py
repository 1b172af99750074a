"""Image-caption data sets for fine-tuning: where they come from, and how a row becomes a training example.

Sources (`load_image_caption_dataset`): a Hub data set id, a folder written by `Dataset.save_to_disk`, a .csv or
.parquet file whose image column holds paths relative to the file, or an `imagefolder` folder (images plus a
`metadata.jsonl` naming each `file_name` and its caption), as diffusers' train_text_to_image.py reads them.
Users' folders are messy, so before training every image is opened once: files that cannot be read are skipped
with one summary (or stop the run, `on_bad_image="error"`), and text files are checked line by line so that a
mistake is reported with its file and line rather than as an Arrow error.

Examples (`ImageCaptionDataset`): RGB (transparency composited on white), shorter side resized to the resolution,
center or random crop, random flip, scaled to [-1, 1]; one caption drawn when a row holds several; the empty
caption with probability `caption_dropout`. Every random choice comes from a generator seeded by
(seed, epoch, row), so an example does not depend on which process, worker or resumed run produces it.
"""

import contextlib
import functools
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .text import logger as text_logger
from .text import tokenize_prompts

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TABLE_LOADERS = {".csv": "csv", ".parquet": "parquet"}
WHITE = (255, 255, 255)
BAD_IMAGE_ACTIONS = ("skip", "error")
JSON_KINDS = {str: "a string", int: "a number", float: "a number", bool: "true/false", list: "a list", dict: "an object"}  # fmt: skip


# 1. Sources


def load_image_caption_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    max_train_samples: int | None = None,
    seed: int | None = None,
    on_bad_image: str = "skip",
) -> datasets.Dataset:
    r"""Load the training split of an image-caption data set, with its image column decoded to PIL images.

    Args:
        dataset_name (`str`, *optional*): A Hub data set id, a `save_to_disk` folder, a .csv/.parquet file, or a
            local data set folder (`load_dataset` infers its format).
        dataset_config_name (`str`, *optional*): The Hub data set's config, if it has several.
        train_data_dir (`str`, *optional*): An `imagefolder` folder (or `data_dir` of `dataset_name`).
        image_column / caption_column (`str`): Column names; a missing one raises an error listing those present.
        max_train_samples (`int`, *optional*): Keep a random subset (drawn with `seed`) of this size.
        on_bad_image (`str`, *optional*, defaults to `"skip"`): What to do with images that cannot be read
            (truncated, empty, not images, missing, decompression bombs): `"skip"` them with one summary
            warning, or raise an `"error"` listing them. See `drop_bad_images`.
    """
    if dataset_name is None and train_data_dir is None:
        raise ValueError("Give a dataset_name (Hub id, file or folder) or a train_data_dir.")
    if on_bad_image not in BAD_IMAGE_ACTIONS:
        raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}.")
    source = dataset_name or train_data_dir
    base_dir = None  # where relative image paths in a table are resolved
    if dataset_name is None:
        dataset = _load_imagefolder(Path(train_data_dir), cache_dir)
    elif Path(dataset_name).suffix.lower() in TABLE_LOADERS:
        path = Path(dataset_name)
        if not path.is_file():
            raise FileNotFoundError(f"Data set file {path} does not exist.")
        if path.suffix.lower() == ".csv":
            for _ in _utf8_lines(path):  # a line that is not UTF-8 raises an error naming it
                pass
        dataset = datasets.load_dataset(
            TABLE_LOADERS[path.suffix.lower()], data_files=str(path), split="train", cache_dir=cache_dir
        )
        base_dir = path.resolve().parent
    elif _is_saved_to_disk(Path(dataset_name)):
        dataset = _train_split(datasets.load_from_disk(dataset_name), source)
    else:
        loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, data_dir=train_data_dir)
        dataset = _train_split(loaded, source)

    for kind, column in (("image", image_column), ("caption", caption_column)):
        if column not in dataset.column_names:
            raise ValueError(
                f"The {kind} column {column!r} is not in the data set {source}; its columns are "
                f"{dataset.column_names}. Pass the right one with --{kind}_column."
            )
    if len(dataset) == 0:
        raise ValueError(f"The data set {source} has no rows.")
    caption_feature = dataset.features[caption_column]
    item = getattr(caption_feature, "feature", caption_feature)  # a list of captions: check its items
    if not (isinstance(item, datasets.Value) and item.dtype in ("string", "large_string", "null")):
        raise ValueError(
            f"The caption column {caption_column!r} of {source} holds {caption_feature}, not text: pass the column "
            f"of captions with --caption_column (the columns are {dataset.column_names}), or convert it to strings."
        )
    if not isinstance(dataset.features[image_column], datasets.Image):
        dataset = _image_paths_to_images(dataset, image_column, base_dir, source)
    if max_train_samples is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(max_train_samples, len(dataset))))
    return drop_bad_images(dataset, image_column, on_bad_image)


def _is_saved_to_disk(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _train_split(loaded: datasets.Dataset | datasets.DatasetDict, source: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"The data set {source} has no 'train' split; its splits are {list(loaded)}.")
        return loaded["train"]
    return loaded


def _load_imagefolder(folder: Path, cache_dir: str | None) -> datasets.Dataset:
    """An `imagefolder` data set, after checking what `datasets` would report obscurely (or not at all)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--train_data_dir {folder} is not a folder.")
    files = [Path(root) / name for root, _, names in os.walk(folder) for name in names]
    images = {f.resolve() for f in files if f.suffix.lower() in IMAGE_EXTENSIONS}
    if not images:
        raise ValueError(f"--train_data_dir {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    metadata_files = [f for f in files if f.name == "metadata.jsonl"]
    named = set().union(*(_check_metadata(metadata) for metadata in metadata_files))
    unlisted = sorted(images - named) if metadata_files else []
    if unlisted:
        logger.warning(
            f"{len(unlisted)} images in {folder} have no line in metadata.jsonl and are not used, e.g. "
            f"{', '.join(p.name for p in unlisted[:5])}."
        )
    return datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=cache_dir)


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """`(number, text)` of each line of a text file; a line that is not UTF-8 raises an error naming it."""
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}, line {number}, is not UTF-8 text (byte {error.start} is {raw[error.start]:#04x}): "
                    "save it as UTF-8."
                ) from None


def _check_metadata(path: Path) -> set[Path]:
    """Check a metadata.jsonl line by line (UTF-8, JSON objects with a `file_name`, one JSON type per key: Arrow
    reports a mix only as "changed from string to array in row 1"); returns the image files it names."""
    named, kinds = set(), {}
    for number, line in _utf8_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}, is not valid JSON: {error}") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise ValueError(
                f"{path}, line {number}, is not a JSON object with a 'file_name' (the image's path relative to "
                f"the file): {line.strip()[:100]}"
            )
        for key, value in (item for item in row.items() if item[1] is not None):  # null fits any type
            kind = JSON_KINDS[type(value)]
            first_kind, first_line = kinds.setdefault(key, (kind, number))
            if kind != first_kind:
                raise ValueError(
                    f"{path}: {key!r} is {first_kind} on line {first_line} but {kind} on line {number}. Use one type "
                    "per key on every line (a single caption as a one-element list when others are lists)."
                )
        named.add((path.parent / row["file_name"]).resolve())
    return named


def _image_paths_to_images(
    dataset: datasets.Dataset, column: str, base_dir: Path | None, source: str
) -> datasets.Dataset:
    """A column of image paths (relative to the table file) becomes a lazily decoded image column."""
    paths = []
    for row, value in enumerate(dataset[column]):
        if not isinstance(value, str):
            raise ValueError(f"{source}: row {row} of column {column!r} is {type(value).__name__}, not an image path.")
        path = Path(value) if base_dir is None else base_dir / value
        if not path.is_file():
            raise FileNotFoundError(
                f"{source}: row {row}: image {path} does not exist (paths are relative to {base_dir})."
            )
        paths.append(str(path))
    dataset = dataset.remove_columns(column).add_column(column, paths)
    return dataset.cast_column(column, datasets.Image())


# 2. Images that cannot be trained on


def image_problem(value: dict | None) -> str | None:
    """Why a stored image (`datasets.Image(decode=False)`: `{"bytes", "path"}`) cannot be used, or `None`."""
    if value is None or (value.get("bytes") is None and value.get("path") is None):
        return "no image"
    data, path = value.get("bytes"), value.get("path")
    if data is None and not os.path.isfile(path):
        return "missing file"
    if (len(data) if data is not None else os.path.getsize(path)) == 0:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.draft(None, (1, 1))  # JPEG: decode at 1/8 scale, still reading every byte
            image.load()
    except Image.DecompressionBombError as error:
        return f"too many pixels, a possible decompression bomb: {error}"
    except UnidentifiedImageError:
        return "not an image"
    except Exception as error:  # a malformed file can make a Pillow decoder raise almost anything
        return "truncated" if "truncated" in str(error) else f"cannot be decoded: {type(error).__name__}: {error}"
    return None


def drop_bad_images(dataset: datasets.Dataset, image_column: str, on_bad_image: str = "skip") -> datasets.Dataset:
    r"""Open every image once (decoding JPEGs at 1/8 scale) and drop the rows whose image cannot be used.

    A truncated download, an empty file, a text file named `.png`, a missing file or a decompression bomb would
    otherwise stop a run hours in, at the batch that draws it. They are found before training instead.

    Args:
        dataset (`datasets.Dataset`): Rows with an image column of type `datasets.Image`.
        image_column (`str`): Its name.
        on_bad_image (`str`, *optional*, defaults to `"skip"`): `"skip"`: drop them, with one warning that counts
            and names them; `"error"`: raise a `ValueError` listing them. No usable image at all is always an error.
    """
    stored = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    problems = {}
    for start in tqdm(range(0, len(stored), 256), desc="Checking images", unit="batch", leave=False):
        for row, value in enumerate(stored[start : start + 256][image_column], start=start):
            if (reason := image_problem(value)) is not None:
                where = value["path"] if value and value.get("bytes") is None else f"row {row}"
                problems[row] = f"{where} ({reason})"
    if not problems:
        return dataset
    named = ", ".join(list(problems.values())[:10]) + (f" and {len(problems) - 10} more" if len(problems) > 10 else "")
    if len(problems) == len(dataset):
        raise ValueError(f"None of the {len(dataset)} images can be used: {named}.")
    if on_bad_image == "error":
        raise ValueError(
            f"{len(problems)} of {len(dataset)} images cannot be used: {named}. Fix or remove them, or leave out "
            "--on_bad_image error to skip them."
        )
    logger.warning(
        f"Skipped {len(problems)} of {len(dataset)} images that cannot be used: {named}. "
        "(--on_bad_image error stops instead.)"
    )
    return dataset.select([row for row in range(len(dataset)) if row not in problems])


# 3. Transforms


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
    """

    resolution: int
    center_crop: bool = False
    random_flip: bool = False

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        crop_u, crop_v, flip_u = rng.random(3)  # always drawn, so a setting never shifts later draws
        image = to_rgb(image)
        scale = self.resolution / min(image.size)
        width, height = (max(self.resolution, round(side * scale)) for side in image.size)
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        if self.center_crop:
            left, top = (width - self.resolution) // 2, (height - self.resolution) // 2
        else:
            left, top = round(crop_u * (width - self.resolution)), round(crop_v * (height - self.resolution))
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


# 4. Captions and the torch data set


def warn_long_captions(dataset: datasets.Dataset, caption_column: str, tokenizer: PreTrainedTokenizerBase) -> int:
    """Count the captions that the tokenizer will cut to its `model_max_length` (77 for CLIP), and say so once
    for the whole data set (`collate_examples` does not repeat it for every batch). Returns the count."""
    captions = []
    for value in dataset[caption_column]:
        captions += ["" if c is None else c for c in (value if isinstance(value, (list, tuple)) else [value])]
    max_length, long = tokenizer.model_max_length, []
    for start in range(0, len(captions), 1024):
        ids = tokenizer(captions[start : start + 1024], truncation=False, verbose=False).input_ids
        long += [start + i for i, tokens in enumerate(ids) if len(tokens) > max_length]
    if long:
        logger.warning(
            f"{len(long)} of {len(captions)} captions are longer than {max_length} tokens and are cut to "
            f"{max_length}, as Stable Diffusion does, e.g. {captions[long[0]][:80]!r}..."
        )
    return len(long)


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

    def __iter__(self):
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.num_rows, generator=generator).tolist())


def collate_examples(examples: list[dict], tokenizer: PreTrainedTokenizerBase) -> dict:
    """Stack examples into a batch and tokenize the captions (`input_ids` `(B, 77)`), cutting long ones quietly:
    `warn_long_captions` reports them once per run."""
    with _quiet(text_logger):
        batch = {"input_ids": tokenize_prompts(tokenizer, [e["caption"] for e in examples])}
    for key in ("pixel_values", "latent_dist"):
        if key in examples[0]:
            batch[key] = torch.stack([e[key] for e in examples]).contiguous()  # (B, C, H, W)
    return batch


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Errors only from `logger` inside the block (a data loader worker or the main loop, one thread each)."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def make_collate_fn(tokenizer: PreTrainedTokenizerBase) -> functools.partial:
    """A picklable `collate_fn` for `DataLoader` (workers get a copy of the tokenizer)."""
    return functools.partial(collate_examples, tokenizer=tokenizer)
