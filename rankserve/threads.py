"""The one place library code changes torch's thread count: a context manager that restores the caller's."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (None: leave them), then restore the caller's setting.

    Entry points (the CLI, a worker's ``__main__``) set threads for the whole process; library code that needs
    a count for one call uses this, so it never leaves the process changed behind it.
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
