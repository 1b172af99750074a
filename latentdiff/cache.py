"""Where the embedded demo keeps what it builds (data, base model), and who may write there."""

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from .atomic import remove_leftovers

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The cache root: ``$LATENTDIFF_CACHE`` when set, else ``~/.cache/latentdiff``."""
    root = os.environ.get("LATENTDIFF_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "latentdiff"


@contextlib.contextmanager
def cache_lock() -> Iterator[Path]:
    """Hold the cache root for the block; a second demo started meanwhile waits for it.

    Two demos would build the same folders at once, and what killed builds left (``.tmp-*`` copies of an
    unpacked package or a model) can be told from a live write only while nothing else writes: so the holder
    removes those leftovers first.
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.warning("Waiting for another latentdiff demo to finish with the cache %s ...", root)
        lock.acquire()
    try:
        for folder in (root, root / "npm", *root.glob("base-build-*")):
            if leftovers := remove_leftovers(folder):
                logger.info("Removed what an interrupted build left: %s", ", ".join(map(str, leftovers)))
        yield root
    finally:
        lock.release()
