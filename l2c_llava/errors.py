"""The one base of every failure the user can fix (a bad file, row, key, folder or flag).

``l2c`` catches :class:`L2CError` once, at the top, and prints its message (which names the file,
row or key and what to do) with exit code 2; any other exception is a bug and keeps its traceback.
Each module's own error (DataError, ConfigError, BuildError, ...) derives from it, and from the
built-in type it always had (ValueError, RuntimeError), so existing ``except`` clauses still match.
"""

from __future__ import annotations


class L2CError(Exception):
    """A user-facing failure: the message says what is wrong, where, and what to do."""


class OutputError(L2CError, ValueError):
    """An output folder that cannot be written, or would replace something the toolkit did not write."""
