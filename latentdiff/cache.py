"""Where the embedded demo keeps what it builds (data, base model), and how it writes folders atomically."""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$LATENTDIFF_CACHE`` when set, else ``~/.cache/latentdiff``."""
    root = os.environ.get("LATENTDIFF_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "latentdiff"


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder beside ``target`` that becomes ``target`` only if the block finishes.

    A crash or Ctrl-C half-way leaves no half-written ``target`` behind (only a ``.tmp-*`` folder that the
    next run ignores and that is removed here when possible), so "the folder exists" means "it is complete".
    An existing ``target`` is replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp's folders are private (0700); the result is an ordinary folder
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
