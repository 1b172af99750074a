"""Image-caption data sets for fine-tuning: where they come from, and which of their rows can be trained on.

Sources (`load_image_caption_dataset`): a Hub data set id, a folder written by `Dataset.save_to_disk`, a .csv or
.parquet file whose image column holds paths relative to the file, or an `imagefolder` folder (images plus a
`metadata.jsonl` naming each `file_name` and its caption), as diffusers' train_text_to_image.py reads them.
Users' folders are messy, so before training every image is opened once: files that cannot be read are skipped
with one summary (or stop the run, `on_bad_image="error"`), and text files are checked line by line so that a
mistake is reported with its file and line rather than as an Arrow error. latentdiff/examples.py turns the rows
into training examples.
"""

import io
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .text import too_long

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TABLE_LOADERS = {".csv": "csv", ".parquet": "parquet"}
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
    verbose: bool = True,
    check_images: bool = True,
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
        verbose (`bool`, *optional*, defaults to `True`): Show the progress bar and warnings; `False` on all
            processes of a multi-process run but the main one, which says them once.
        check_images (`bool`, *optional*, defaults to `True`): Open every image (`drop_bad_images`); `False` for a
            caller that checks them itself, as training does, shared out among its processes.
    """
    if dataset_name is None and train_data_dir is None:
        raise ValueError("Give a dataset_name (Hub id, file or folder) or a train_data_dir.")
    if on_bad_image not in BAD_IMAGE_ACTIONS:
        raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}.")
    source = dataset_name or train_data_dir
    base_dir = None  # where relative image paths in a table are resolved
    if dataset_name is None:
        dataset = _load_imagefolder(Path(train_data_dir), cache_dir, verbose)
    elif Path(dataset_name).suffix.lower() in TABLE_LOADERS:
        path = Path(dataset_name)
        if not path.is_file():
            raise FileNotFoundError(
                f"Data set file {path} does not exist: --dataset_name takes a Hub data set id, a folder written by "
                "save_to_disk, or an existing .csv or .parquet file (a folder of images: --train_data_dir)."
            )
        if path.suffix.lower() == ".csv":
            for _ in _utf8_lines(path):  # a line that is not UTF-8 raises an error naming it
                pass
        dataset = datasets.load_dataset(
            TABLE_LOADERS[path.suffix.lower()], data_files=str(path), split="train", cache_dir=cache_dir
        )
        base_dir = path.resolve().parent
    elif Path(dataset_name).is_file():  # would be looked up on the Hub, and "not found" there
        raise ValueError(
            f"--dataset_name {dataset_name} is a {Path(dataset_name).suffix or 'suffix-less'} file: it takes a Hub "
            "data set id, a data set folder (save_to_disk or parquet shards), or a .csv or .parquet table; images "
            "with a metadata.jsonl: give their folder as --train_data_dir."
        )
    elif _is_saved_to_disk(Path(dataset_name)):
        dataset = _train_split(datasets.load_from_disk(dataset_name), source)
    else:
        loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, data_dir=train_data_dir)
        dataset = _train_split(loaded, source)

    for kind, column in (("image", image_column), ("caption", caption_column)):
        if column not in dataset.column_names:
            folder = Path(source)
            if dataset.column_names == ["image"] and folder.is_dir() and not any(folder.rglob("metadata.*")):
                raise ValueError(
                    f"{source} holds images but no captions: add a metadata.jsonl with one line per image, "
                    '{"file_name": "0001.png", "text": "a caption"} (docs/training.md).'
                )
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
    return drop_bad_images(dataset, image_column, on_bad_image, verbose) if check_images else dataset


def _is_saved_to_disk(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _train_split(loaded: datasets.Dataset | datasets.DatasetDict, source: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"The data set {source} has no 'train' split; its splits are {list(loaded)}.")
        return loaded["train"]
    return loaded


def _load_imagefolder(folder: Path, cache_dir: str | None, verbose: bool = True) -> datasets.Dataset:
    """An `imagefolder` data set, after checking what `datasets` would report obscurely (or not at all)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--train_data_dir {folder} is not a folder.")
    if not os.access(folder, os.R_OK | os.X_OK):  # os.walk would see nothing in it, and say "no images"
        raise PermissionError(f"--train_data_dir {folder} cannot be read (permission denied): fix its permissions.")
    files = [Path(root) / name for root, _, names in os.walk(folder) for name in names]
    images = {f.resolve() for f in files if f.suffix.lower() in IMAGE_EXTENSIONS}
    if not images:
        raise ValueError(f"--train_data_dir {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    metadata_files = [f for f in files if f.name == "metadata.jsonl"]
    named = set().union(*(_check_metadata(metadata) for metadata in metadata_files))
    unlisted = sorted(images - named) if metadata_files else []
    if unlisted and verbose:
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
    try:  # everything that touches the file: an error on one process alone would leave the others waiting for it
        if (len(data) if data is not None else os.path.getsize(path)) == 0:
            return "empty file"
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


def find_bad_images(
    dataset: datasets.Dataset, image_column: str, part: int = 0, parts: int = 1, threads: int | None = None,
    verbose: bool = True,
) -> dict[int, str]:
    r"""The rows whose image cannot be used, with why (`image_problem`), among the `part`-th of `parts` equal runs
    of rows: the processes of a run each check one and pool what they find.

    At about 1 ms per 512 px JPEG a million images take 17 minutes on one core, so the images are opened on
    `threads` threads (Pillow decodes without the GIL: 2 threads check 1.9-2.2× as fast on 2 cores,
    benchmarks/image_check.py).

    Args:
        part / parts (`int`, *optional*, defaults to 0 / 1): Which contiguous run of rows to check.
        threads (`int`, *optional*): Defaults to torch's thread count (one per core, or what `OMP_NUM_THREADS` or
            the launcher set).
        verbose (`bool`, *optional*, defaults to `True`): Show the progress bar.
    """
    first, stop = len(dataset) * part // parts, len(dataset) * (part + 1) // parts
    stored = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    problems = {}
    with ThreadPoolExecutor(threads or torch.get_num_threads()) as pool:
        starts = tqdm(range(first, stop, 256), desc="Checking images", unit="batch", leave=False, disable=not verbose)
        for start in starts:
            values = stored[start : min(start + 256, stop)][image_column]
            for row, (value, reason) in enumerate(zip(values, pool.map(image_problem, values)), start=start):
                if reason is not None:
                    where = value["path"] if value and value.get("bytes") is None else f"row {row}"
                    problems[row] = f"{where} ({reason})"
    return problems


def drop_bad_images(
    dataset: datasets.Dataset, image_column: str, on_bad_image: str = "skip", verbose: bool = True,
    problems: dict[int, str] | None = None,
) -> datasets.Dataset:
    r"""Drop the rows whose image cannot be used (every image opened once, JPEGs decoded at 1/8 scale).

    A truncated download, an empty file, a text file named `.png`, a missing file or a decompression bomb would
    otherwise stop a run hours in, at the batch that draws it. They are found before training instead.

    Args:
        dataset (`datasets.Dataset`): Rows with an image column of type `datasets.Image`.
        image_column (`str`): Its name.
        on_bad_image (`str`, *optional*, defaults to `"skip"`): `"skip"`: drop them, with one warning that counts
            and names them; `"error"`: raise a `ValueError` listing them. No usable image at all is always an error.
        verbose (`bool`, *optional*, defaults to `True`): Show the progress bar and the warning.
        problems (`dict[int, str]`, *optional*): What `find_bad_images` found, when the caller has looked already
            (each process of a run at one part); by default every image is checked here.
    """
    if problems is None:
        problems = find_bad_images(dataset, image_column, verbose=verbose)
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
    if verbose:
        logger.warning(
            f"Skipped {len(problems)} of {len(dataset)} images that cannot be used: {named}. "
            "(--on_bad_image error stops instead.)"
        )
    return dataset.select([row for row in range(len(dataset)) if row not in problems])


# 3. Captions that will be cut


def warn_long_captions(dataset: datasets.Dataset, caption_column: str, tokenizer: PreTrainedTokenizerBase) -> int:
    """Count the captions that the tokenizer will cut to its `model_max_length` (77 for CLIP), and say so once
    for the whole data set (`collate_examples` does not repeat it for every batch). Returns the count."""
    captions = []
    for value in dataset[caption_column]:
        captions += ["" if c is None else c for c in (value if isinstance(value, (list, tuple)) else [value])]
    max_length, long = tokenizer.model_max_length, too_long(tokenizer, captions)
    if long:
        logger.warning(
            f"{len(long)} of {len(captions)} captions are longer than {max_length} tokens and are cut to "
            f"{max_length}, as Stable Diffusion does, e.g. {captions[long[0]][:80]!r}..."
        )
    return len(long)
