"""Where the ``local`` store's files live, and the check that only the server's user can touch them.

The counts decide who gets through: a file another user can write (or made
first, at a name they can guess) would let them switch limits off or lock
clients out. So the default file is in a folder of this user's own, mode
0700, in memory-backed ``/dev/shm`` where there is one; the files are made
0600 by this process (``O_EXCL | O_NOFOLLOW``: never through a link another
user planted); and every path is looked at with ``lstat`` before it is used:
a store path another user owns, or other users may write, is refused with
one line naming it. No lmdb here: ``config`` runs the check at start.
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from typing import Callable

LOCK_SUFFIX = "-lock"  # LMDB's lock file beside the data file (subdir=False)


class UnsafeStorePath(ValueError):
    """A store path another user owns or may write; the message is one line naming it."""


def default_dir() -> str:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"forkproxy-{os.getuid()}")


def default_path() -> str:
    return os.path.join(default_dir(), "limits.lmdb")


def store_path(spec: str) -> str:
    """The file a ``local`` or ``local:PATH`` spec names."""
    return os.path.abspath(spec[len("local:"):]) if spec.startswith("local:") else default_path()


def check(path: str) -> None:
    """Raise UnsafeStorePath if another user owns, or other users may write, the store or its folder."""
    folder = os.path.dirname(path)
    if folder == default_dir():
        _own_private_folder(folder)
    else:
        _folder_others_cannot_replace_in(folder)
    for name in (path, path + LOCK_SUFFIX):
        _own_file(name)


def prepare(path: str) -> None:
    """Make the default folder (0700) and the store's files (0600) if they are missing, then check them all."""
    folder = os.path.dirname(path)
    if folder == default_dir():
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
    for name in (path, path + LOCK_SUFFIX):
        try:
            os.close(os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except FileExistsError:
            pass
    check(path)


def _lstat(path: str) -> os.stat_result | None:
    """The path's own status (a link is not followed), None if it is not there yet."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnsafeStorePath(f"limits store path {path}: {os.strerror(exc.errno or errno.EIO)}") from None


def _own_private_folder(folder: str) -> None:
    _own(folder, stat.S_ISDIR, "limits store folder {} is not a folder (a link or a file is refused)",
         0o077, "limits store folder {} is open to other users (mode {:o}, must be 700)")


def _folder_others_cannot_replace_in(folder: str) -> None:
    """A named file's folder: root's or this user's, and not writable by others unless sticky (as /tmp is)."""
    try:
        st = os.stat(folder)  # a folder may be reached through a link (/var/run): what counts is the folder
    except OSError as exc:
        raise UnsafeStorePath(f"limits store folder {folder}: {os.strerror(exc.errno or errno.EIO)}") from None
    if st.st_uid not in (0, os.getuid()):
        raise UnsafeStorePath(f"limits store folder {folder} is owned by another user (uid {st.st_uid})")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UnsafeStorePath(f"limits store folder {folder} may be written by other users "
                              f"(mode {st.st_mode & 0o777:o}): they could replace the store")


def _own_file(path: str) -> None:
    _own(path, stat.S_ISREG, "limits store file {} is not a plain file (a link is refused)",
         0o022, "limits store file {} may be written by other users (mode {:o})")


def _own(path: str, is_kind: Callable[[int], bool], not_kind: str, open_bits: int, too_open: str) -> None:
    """``path``, when it is there: of the kind asked for (never a link), this user's, without ``open_bits``."""
    st = _lstat(path)
    if st is None:
        return
    if not is_kind(st.st_mode):
        raise UnsafeStorePath(not_kind.format(path))
    _owned(path, st)
    if st.st_mode & open_bits:
        raise UnsafeStorePath(too_open.format(path, st.st_mode & 0o777))


def _owned(path: str, st: os.stat_result) -> None:
    if st.st_uid != os.getuid():
        raise UnsafeStorePath(f"limits store path {path} is owned by another user (uid {st.st_uid}), "
                              f"not this server's (uid {os.getuid()})")
