"""The one error type for bad input (#13): a file, an argument, a config or a request that cannot be used.

Library code raises :class:`InputError` with a message that names the problem and the fix; the CLI prints that
message as one line (exit 2) and the server answers 400 with it. Anything else is a bug and keeps its traceback.
It subclasses ``ValueError`` so that library callers catching ``ValueError`` keep working.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input whose message is the whole story."""
