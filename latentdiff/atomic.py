"""Writing files and folders so that a crash never leaves half of one: write beside the target, then rename.

A rename within one file system is atomic, so the target either keeps its old content or has the new one whole;
what a crash leaves is only a hidden ``.tmp-*`` sibling that readers ignore. The new content is flushed to the disk
before the rename and the rename after it, so a power cut or a preempted machine, which lose the OS's unwritten
cache, cannot leave an empty or half-written file under the final name either (ext4 and XFS may otherwise put
the rename on the disk before the data).
"""

import contextlib
import errno
import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


_WINDOWS = os.name == "nt"
# What a file system that keeps nothing to flush, or cannot flush (some FUSE and network ones, /proc), answers an
# fsync with; a failing disk (EIO) or a full one (ENOSPC, EDQUOT) is an error.
_CANNOT_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_REPLACED = ".replaced-"  # prefix of a folder that `replace_folder` moved aside
LEFTOVER_PREFIXES = (".tmp-", ".old-", _REPLACED)  # what interrupted writes leave: never part of the content
# The names themselves: a random 8-character suffix (`tempfile`'s), a step, or a process id. A user's own
# ".tmp-notes.txt" in the same folder matches none of them, and is left alone.
_LEFTOVER_NAME = re.compile(r"\.tmp-.+-[a-z0-9_]{8}|\.tmp-checkpoint-\d+|\.old-.+-\d+|\.replaced-.+-\d+")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write that replaces ``path`` only once the block finishes; on an error it is removed.

    The temporary sibling (``.tmp-<name>-*``) has a name of its own, so two writers of one path never share it;
    the result is an ordinary 0644 file (``mkstemp`` makes private ones).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _sync(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` with `atomic_file`; returns ``path``."""
    with atomic_file(path) as handle:
        handle.write(text.encode("utf-8"))
    return Path(path)


def replace_folder(finished: Path, target: Path) -> None:
    """Move the complete folder ``finished`` to ``target``, replacing what is there.

    A folder cannot be renamed over a non-empty one, so the old ``target`` is first renamed aside (``.replaced-*``)
    and deleted only after the new one is in place: ``target`` is the old folder, the new one, or (between the two
    renames) absent with the old one whole beside it, which `remove_leftovers` then puts back.
    """
    _sync_tree(finished)
    if target.exists():
        old = _move_aside(target, _REPLACED)
        os.replace(finished, target)
        _sync(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(finished, target)
        _sync(target.parent)


def replace_file(finished: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the complete file ``finished`` (written by another library beside ``target``) over ``target``, with
    its content on the disk before the rename and the rename on the disk after it."""
    _sync(Path(finished))
    os.replace(finished, target)
    _sync(Path(target).parent)


def make_folder(folder: str | os.PathLike) -> Path:
    """``mkdir -p`` whose new folders are on the disk: each one's entry in its parent is flushed. The syncs of the
    files later written into a folder do not cover the folder's own name, so a machine crash soon after a run
    made ``out/`` could otherwise lose ``out/`` with every flushed file in it. Returns the folder."""
    folder = Path(folder)
    new = list(itertools.takewhile(lambda path: not path.exists(), (folder, *folder.parents)))
    folder.mkdir(parents=True, exist_ok=True)
    for created in new:
        _sync(created.parent)
    return folder


def _sync_tree(folder: str | os.PathLike) -> None:
    """Flush every file and folder under ``folder``, and ``folder`` itself, from the OS cache to the disk: the
    step before a rename that publishes it, since a crash of the machine (not only of the process) must not
    find the new name pointing at data that never reached the disk. Writers such as safetensors, torch.save and
    Accelerate's ``save_state`` close their files without this."""
    folder = Path(folder)
    for path in folder.rglob("*"):
        if not path.is_symlink() and (path.is_file() or path.is_dir()):  # opening a named pipe would block
            _sync(path)
    _sync(folder)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder beside ``target`` that becomes ``target`` only if the block finishes.

    A crash or Ctrl-C half-way leaves no half-written ``target`` behind (only a ``.tmp-*`` folder that the
    next run ignores and that is removed here when possible), so "the folder exists" means "it is complete".
    An existing ``target`` is replaced.
    """
    target = Path(target)
    make_folder(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp's folders are private (0700); the result is an ordinary folder
    try:
        yield tmp
        _make_ordinary(tmp)
        replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_entries(target: str | os.PathLike, marker: str, stale: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yields a temporary folder inside ``target`` whose entries, if the block finishes, replace the same-named
    entries of ``target``; the rest of ``target`` stays. For a folder that holds more than one write's output (a
    training run's pipeline beside its checkpoints and logs), which `atomic_dir` cannot replace whole.

    ``marker`` (e.g. ``model_index.json``) is moved aside first and moved in last, and the old entries, with the
    ``stale`` ones that describe the old content, are deleted only after the new ones are in: a crash half-way
    leaves a folder without its marker (it loads neither as the old content nor as a mix of old and new parts),
    with the old entries whole beside it as ``.old-*``.
    """
    target = Path(target)
    make_folder(target)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-entries-", dir=target))
    tmp.chmod(0o755)  # mkdtemp's folders are private (0700); the entries become ordinary folders
    try:
        yield tmp
        _make_ordinary(tmp)
        _sync_tree(tmp)
        names = sorted(path.name for path in tmp.iterdir() if path.name != marker)
        aside = []
        for name in (marker, *names, *stale):
            if (target / name).exists():
                aside.append(_move_aside(target / name))
        for name in names:
            os.replace(tmp / name, target / name)
        os.replace(tmp / marker, target / marker)
        _sync(target)
        for old in aside:
            _remove(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Free space below which a failed write is taken to have filled the disk: writers do not all say so (torch's zip
# writer reports a short write as "unexpected pos", safetensors wraps the OS error in its own exception type).
_NEARLY_FULL = 16 * 2**20


@contextlib.contextmanager
def disk_full_explained(
    folder: str | os.PathLike, writing: str, advice: str, partial: str | os.PathLike | None = None
) -> Iterator[None]:
    """Turns a write that failed because the disk filled up into one `OSError` (errno ``ENOSPC``) that says so.

    The partial output ``partial``, if given, is deleted first, which gives the space back; the error names what
    was being written, the free space left, and ``advice`` (what is intact and how to go on). Any other failure is
    re-raised unchanged.
    """
    try:
        yield
    except Exception as error:
        if not _filled_the_disk(error, folder):
            raise
        if partial is not None:
            _remove(Path(partial))
        usage = shutil.disk_usage(folder)
        full = OSError(
            f"Could not write {writing}: the disk holding {folder} is full ({usage.free / 2**20:.0f} MiB free of "
            f"{usage.total / 2**20:.0f} MiB once the partial write was removed). {advice}"
        )
        full.errno = errno.ENOSPC
        raise full from error


def _filled_the_disk(error: Exception, folder: str | os.PathLike) -> bool:
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(error):
        return True
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL
    except OSError:  # the folder itself is gone (removed during the run): that is the error to report
        return False


def remove_folder(path: str | os.PathLike) -> None:
    """Delete a folder so that it is whole or gone, never half-deleted under its own name: it is renamed aside
    (``.old-*``) first, which `remove_leftovers` finishes deleting if this is stopped."""
    _remove(_move_aside(Path(path)))


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.tmp-*`` and ``.old-*`` entries that interrupted atomic writes left in ``folder`` (by the names
    they give: other files of those prefixes are not theirs); returns them.

    A folder that `replace_folder` had moved aside when it was stopped, before the new one was in, is put back.
    Only while nothing writes into ``folder`` (a run's start): the names of live writes look the same.
    """
    folder = Path(folder)
    leftovers = sorted(p for p in folder.iterdir() if _LEFTOVER_NAME.fullmatch(p.name)) if folder.is_dir() else []
    for path in leftovers:
        replaced = folder / path.name.removeprefix(_REPLACED).rsplit("-", 1)[0]
        if path.name.startswith(_REPLACED) and not replaced.exists():
            os.replace(path, replaced)
        else:
            _remove(path)
    return leftovers


def _move_aside(path: Path, prefix: str = ".old-") -> Path:
    """Rename ``path`` to ``<prefix><name>-<pid>`` beside it (replacing a leftover of that name); returns the new
    path. `remove_leftovers` recognises these names."""
    aside = path.with_name(f"{prefix}{path.name}-{os.getpid()}")
    _remove(aside)
    os.replace(path, aside)
    return aside


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Fail now, with what to do, if ``folder`` is a file, or if it (while it does not exist: the folder it would be
    made in) takes no files: before hours of work whose result would then have nowhere to go."""
    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder} is a file: give a folder (it is created if missing).")
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():  # the folder would be made inside a file: mkdir fails, after the work
        raise ValueError(f"{what} {folder} cannot be created: {existing} is a file. Give a folder outside it.")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".tmp-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        if not isinstance(error, PermissionError) and error.errno != errno.EROFS:
            return  # not a folder, gone, ...: the write itself will say what is wrong
        raise PermissionError(
            f"{what} {folder} is not writable ({existing} refuses new files: {error.strerror}): give a folder you "
            "can write to, or fix its permissions."
        ) from None


def _sync(path: Path) -> None:
    """``fsync`` one file, or one folder (which puts its renames and new entries on the disk)."""
    if _WINDOWS and path.is_dir():
        return  # Windows cannot open a folder as a file; NTFS journals its renames
    # Windows' fsync (FlushFileBuffers) needs a handle open for writing: on a read-only one it fails with EBADF
    fd = os.open(path, os.O_RDWR if _WINDOWS else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in _CANNOT_SYNC:
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _make_ordinary(folder: Path) -> None:
    """Files that a writer created private (0600: safetensors ≥ 0.8 and `tempfile` write so) become ordinary
    0644 files, like everything else a run writes."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600:
            path.chmod(0o644)
