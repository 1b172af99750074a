"""Writing files and folders so that a crash never leaves half of one: write beside the target, then rename.

A rename within one file system is atomic, so the target either keeps its old content or has the new one whole;
what a crash leaves is only a hidden ``.tmp-*`` sibling that readers ignore.
"""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling and a rename; returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def replace_folder(finished: Path, target: Path) -> None:
    """Move the complete folder ``finished`` to ``target``, replacing what is there.

    A folder cannot be renamed over a non-empty one, so the old ``target`` is first renamed aside and deleted
    only after the new one is in place: at every moment ``target`` is either the old folder or the new one.
    """
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(finished, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(finished, target)


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
        replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
