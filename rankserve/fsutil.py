"""Filesystem steps that survive a kill: temporary directories that name their owner's pid, the sweep that
removes those of dead processes, an atomic exchange of two directories and the swap of a finished directory into
place built on it; plus rankserve's cache directory and its JSON files.

A process killed with SIGKILL (or by the OOM killer) runs no ``finally`` and no ``atexit``, so a self-cleaning
temporary directory is not enough: the next run must be able to tell a leftover from the live work of another
process. Writing the pid into the name makes that a ``kill(pid, 0)``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
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


def cache_dir(*parts: str) -> str:
    """rankserve's on-disk cache (``$RANKSERVE_CACHE``, else ``~/.cache/rankserve``), joined with ``parts``."""
    root = os.environ.get("RANKSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rankserve")
    return os.path.join(root, *parts)


def dir_mode() -> int:
    """0o777 minus the process umask, read without changing it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o777 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o755


def write_json(path: str, obj: dict) -> None:
    """``obj`` as indented JSON (NaN refused), with lists of numbers such as shapes kept on one line."""
    text = json.dumps(obj, indent=2, allow_nan=False)
    # Only pretty-printed lists span lines (a JSON string never holds a raw newline), so string contents are
    # never touched.
    num = r"-?[\d.eE+-]+"
    text = re.sub(
        rf"\[\n\s*({num}(?:,\n\s*{num})*)\n\s*\]", lambda m: "[" + re.sub(r",\n\s*", ", ", m[1]) + "]", text
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


# replace_dir's fallback sets the old directory NAME aside as ``.NAME.old-<pid>-<random>``; the pid tells a
# killed swap's leftover from another process's live one.
_OLD_PREFIX = r"\.(?P<name>.+)\.old-"


def replace_dir(new: str, target: str, overwrite: bool) -> None:
    """Put the finished directory ``new`` at ``target``. An existing ``target`` (a directory) raises
    FileExistsError unless ``overwrite``; then it ends up at ``new`` (the caller removes it), and ``target``
    names a whole directory, old or new, at every instant where the OS and filesystem can exchange atomically
    (:func:`exchange`)."""
    parent, name = os.path.split(target)
    if not os.path.exists(target):
        try:
            os.rename(new, target)  # fails if target appeared meanwhile and is non-empty
            return
        except OSError:
            if not os.path.exists(target):
                raise
    if not overwrite:
        raise FileExistsError(errno.EEXIST, "already exists", target)
    if exchange(new, target):
        return
    # No atomic exchange on this OS or filesystem (NFS, Windows, some FUSE): two renames, with a moment in
    # between when the name is empty. The old directory is set aside under a pid-tagged name, so if this
    # process dies there, the next writer into this parent, or the next load of the name, puts it back
    # (recover_leftovers). We do not make the name a symlink to versioned directories instead: that changes
    # what a checkpoint is on disk for every user (copy and upload tools see a link), and an existing real
    # directory still could not be turned into such a link atomically.
    aside = owned_tempdir(f".{name}.old-", parent)
    os.rmdir(aside)  # only the unique name is wanted; rename needs the target free
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)  # put the old directory back
        raise
    shutil.rmtree(aside, ignore_errors=True)


def recover_leftovers(parent: str, tmp_prefix: str) -> None:
    """Clean up after writes into ``parent`` that were killed: temporary directories named ``tmp_prefix``
    (a regular expression, see :func:`owned_tempdir`) are removed, and an old directory that the fallback of
    :func:`replace_dir` had set aside is put back under its name if that name is empty (removed otherwise).
    Only leftovers of dead processes are touched."""
    sweep(parent, tmp_prefix)
    for m in dead_leftovers(parent, _OLD_PREFIX):
        aside, target = os.path.join(parent, m[0]), os.path.join(parent, m["name"])
        try:
            if os.path.lexists(target):
                shutil.rmtree(aside)
            else:
                os.rename(aside, target)
                log.warning("restored %s, set aside by an overwrite that was interrupted", target)
        except OSError:
            pass  # a read-only parent or a race with another run: the next run tries again
