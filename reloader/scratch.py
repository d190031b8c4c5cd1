"""Folders of the server's own in the temporary directory (TMPDIR), which outlive no server.

A compiled form is built in a folder there (packages.py; a resnet18 int8 build killed here left 72 MB), and
fp32's libraries are kept in another (libraries.Kept). Each is removed when its work ends or the process
exits; a server killed before that (SIGKILL at the end of a grace period, the OOM killer) left them behind.
Under Kubernetes, /tmp is an emptyDir with a size limit (deploy/) that a container's restart keeps: a server
killed during a build a few times over would fill it, and the pod would be evicted.

So each folder holds a lock, taken before the folder can be seen as its owner's (flock: the kernel lets go
of it when its process dies, whatever kills it), and a server starting removes the folders whose lock is
free (`sweep`). Servers that share a TMPDIR (replicas on one host) leave each other's live folders alone,
and others' folders (mode 0700) are out of its reach anyway. A folder without a lock (not this module's) is
left alone too. Under systemd, PrivateTmp gives the service a /tmp of its own that systemd removes at stop.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
import tempfile
import weakref
from pathlib import Path
from types import TracebackType

logger = logging.getLogger("reloader.scratch")

PREFIX = "reloader-"
LOCK = ".owner"


class Scratch:
    """A fresh folder `path` in TMPDIR, named after `kind`, locked for as long as this process uses it; removed
    by `remove()`, at the end of a `with` block, when the object is collected, or at exit."""

    def __init__(self, kind: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-"))  # this user's alone (mode 0700)
        fd = None
        try:
            # Locked under another name, then renamed: a sweep never sees the lock before it is held.
            claiming = self.path / f"{LOCK}.new"
            fd = os.open(claiming, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(claiming, self.path / LOCK)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            if fd is not None:
                os.close(fd)
            raise
        self._finalizer = weakref.finalize(self, _remove, self.path, fd)

    def remove(self) -> None:
        self._finalizer()

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.remove()


def _remove(path: Path, fd: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.close(fd)  # let go of the lock only once the folder is gone


def sweep(root: Path | None = None) -> list[tuple[Path, int]]:
    """Remove the folders in `root` (TMPDIR) that a process of this module's made and died without removing;
    returns each with the bytes it held. Run once as a server starts."""
    root = Path(tempfile.gettempdir()) if root is None else root
    removed = []
    for path in sorted(root.glob(f"{PREFIX}*")):
        try:
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():  # not a link, and this user's
                continue
            fd = os.open(path / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:  # gone meanwhile, or without a lock
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                logger.warning("cannot tell whether %s is still in use: %s", path, exc)
            continue  # its owner lives
        try:
            size = _size(path)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append((path, size))
    return removed


def _size(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total
