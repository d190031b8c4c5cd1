"""Opening files that something outside the daemon controls, without being made to read forever or block."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO


def open_regular(path: Path, *, follow_links: bool) -> BinaryIO:
    """Open `path` for reading only if it is a regular file, never blocking on a FIFO.

    A checkpoint folder is written by others: between a scan and the open, a path may have become a
    symlink to /dev/zero (which never ends) or a FIFO (which blocks for good), so checkpoints are opened
    with follow_links=False. Files the config names may be links (a ConfigMap's are): True there."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links:
            raise OSError(errno.ELOOP, "a symbolic link, not a regular file", str(path)) from exc
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"not a regular file (mode {stat.filemode(mode)})", str(path))
    return os.fdopen(fd, "rb")


def open_for_writing(fh: BinaryIO) -> bool | None:
    """Whether some process (this one included) has the file open for writing; None where no one can tell.

    Linux grants a read lease only while no descriptor anywhere has the file open for writing, and says
    EAGAIN otherwise (fcntl(2), F_SETLEASE), so taking one and letting it go at once answers the question
    without reading /proc. It is not granted (EACCES) on a file owned by another user without
    CAP_LEASE, nor (EINVAL) on filesystems without leases (NFS, FUSE): None there, and the caller falls
    back on its own signs of a writer."""
    fd = fh.fileno()
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno == errno.EAGAIN else None
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


# Control characters (a newline in a file name would forge a log line) shown as \xNN.
_CONTROL = {code: f"\\x{code:02x}" for code in (*range(32), 127)}


def shown(path: Path | str) -> str:
    """A file name as text safe to put anywhere (JSON, a log line): bytes that are not UTF-8 and control
    characters become \\xNN. Names are data; the daemon never shows one as it came."""
    return os.fsencode(path).decode("utf-8", "backslashreplace").translate(_CONTROL)
