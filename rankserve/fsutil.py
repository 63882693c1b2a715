"""Filesystem steps that survive a kill: temporary directories that name their owner's pid, the sweep that
removes those of dead processes, and an atomic exchange of two directories.

A process killed with SIGKILL (or by the OOM killer) runs no ``finally`` and no ``atexit``, so a self-cleaning
temporary directory is not enough: the next run must be able to tell a leftover from the live work of another
process. Writing the pid into the name makes that a ``kill(pid, 0)``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import re
import shutil
import sys
import tempfile

log = logging.getLogger(__name__)

# errno values by which renameat2 / renamex_np say "this kernel or filesystem cannot exchange"
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS sys/stdio.h


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is someone else's
    except OverflowError:
        return False
    return True


def owned_tempdir(prefix: str, parent: str | None = None) -> str:
    """``mkdtemp`` named ``<prefix><pid>-<random>``, after sweeping the same prefix's leftovers of dead pids."""
    parent = tempfile.gettempdir() if parent is None else parent
    sweep(parent, re.escape(prefix))
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)


def dead_leftovers(parent: str, prefix: str) -> list[re.Match]:
    """Entries of ``parent`` named ``<prefix><pid>-<random>`` (as :func:`owned_tempdir` names them; ``prefix``
    is a regular expression) whose pid is dead, as matches with the pid in group ``pid``."""
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return []
    found = []
    for entry in entries:
        m = re.fullmatch(rf"(?:{prefix})(?P<pid>\d+)-[^-/]+", entry)
        if m and not pid_alive(int(m["pid"])):
            found.append(m)
    return found


def sweep(parent: str, prefix: str) -> list[str]:
    """Remove the directories of :func:`dead_leftovers` and return their paths. Failures (a read-only parent,
    a race with another sweeper) are not errors: the next run tries again."""
    removed = []
    for m in dead_leftovers(parent, prefix):
        path, pid = os.path.join(parent, m[0]), int(m["pid"])
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log.info("removed %s, left by process %d", path, pid)
    return removed


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def exchange(a: str, b: str) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (both must exist); False when the OS or filesystem cannot.

    Linux has ``renameat2(RENAME_EXCHANGE)`` (3.15+, glibc 2.28+; ext4, xfs, btrfs, tmpfs, overlayfs),
    macOS ``renamex_np(RENAME_SWAP)``; Python exposes neither, hence ctypes.
    """
    libc = _libc()
    a_b, b_b = os.fsencode(a), os.fsencode(b)
    if sys.platform.startswith("linux") and libc is not None and hasattr(libc, "renameat2"):
        rc = libc.renameat2(_AT_FDCWD, a_b, _AT_FDCWD, b_b, ctypes.c_uint(_RENAME_EXCHANGE))
    elif sys.platform == "darwin" and libc is not None and hasattr(libc, "renamex_np"):
        rc = libc.renamex_np(a_b, b_b, ctypes.c_uint(_RENAME_SWAP))
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), a, None, b)
