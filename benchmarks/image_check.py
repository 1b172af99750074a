"""How long the check of every image before training takes, by threads and by the processes' share of it.

Builds a folder of JPEGs (smooth noise, 512×512 by default), loads it as training does
(`load_image_caption_dataset(..., check_images=False)`), and times `find_bad_images` on one thread and on more,
and one process's part when the check is shared out among several (its wall time is the check's when each
process has cores of its own). Prints ms per image of the data set and the speed-up against one thread checking
everything, which is what each process of a run did before, one process after the other.

    python benchmarks/image_check.py                       # 400 images, threads 1 and os.cpu_count()
    python benchmarks/image_check.py --images 2000 --threads 1 2 4 --parts 2
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from latentdiff.data import find_bad_images, load_image_caption_dataset


def write_jpeg_folder(folder: Path, count: int, size: int) -> Path:
    """`count` JPEGs with a metadata.jsonl; smooth noise, so each compresses like a photo rather than a flat fill."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    lines = []
    for i in range(count):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i}.jpg", quality=90)
        lines.append(json.dumps({"file_name": f"{i}.jpg", "text": f"picture {i}"}) + "\n")
    (folder / "metadata.jsonl").write_text("".join(lines))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--parts", type=int, default=2, help="processes the check is shared out among")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per figure")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_jpeg_folder(Path(tmp) / "images", args.images, args.size)
        rows = load_image_caption_dataset(
            train_data_dir=str(folder), cache_dir=str(Path(tmp) / "cache"), check_images=False, verbose=False
        )

        def best_ms_per_image(threads: int, parts: int) -> float:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                found = find_bad_images(rows, "image", 0, parts, threads=threads, verbose=False)
                times.append(time.perf_counter() - start)
                assert not found, found
            return min(times) * 1000 / args.images

        print(f"Image check: {args.images} JPEGs of {args.size}×{args.size}, {os.cpu_count()} cores, best of "
              f"{args.repeats}")  # fmt: skip
        print(f"{'threads':>8} {'parts':>6} {'wall ms per image of the data set':>34} {'speed-up':>9}")
        baseline = best_ms_per_image(1, 1)
        print(f"{1:>8} {1:>6} {baseline:>34.3f} {1.0:>9.2f}")
        for threads in args.threads:
            for parts in sorted({1, args.parts}):
                if (threads, parts) != (1, 1):
                    ms = best_ms_per_image(threads, parts)
                    print(f"{threads:>8} {parts:>6} {ms:>34.3f} {baseline / ms:>9.2f}")


if __name__ == "__main__":
    main()
