"""The one base of every failure the user can fix (a bad file, row, key, folder or flag).

``l2c`` catches :class:`L2CError` once, at the top (``cli.main``), and prints its message (which names
the file, row or key and what to do) with the error's ``exit_code`` (2, bad input); any other
exception is a bug and keeps its traceback. Each module's own error (DataError, ConfigError,
BuildError, ...) derives from it, and from the built-in type it always had (ValueError,
RuntimeError, FileNotFoundError), so existing ``except`` clauses and tests still match.

A module without an error class of its own raises :class:`InputError` (a value the user gave that
cannot be used), :class:`MissingFileError` (a file or folder the user named that is not there),
:class:`OutputError` / :class:`OutputExistsError` (an output that cannot be written or would replace
something else) or :class:`CannotRunError` (a step that cannot run here or now). A module keeps an
error class of its own only where a caller tells it apart: catches it by name (ConfigError, ImageError,
BuildError, ...) or exits with another code (HardSetError, PipelineError: 1, a failed run).
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2


class L2CError(Exception):
    """A user-facing failure: the message says what is wrong, where, and what to do."""

    exit_code: int = EXIT_BAD_INPUT


class InputError(L2CError, ValueError):
    """A value, setting or file content the user gave that cannot be used."""


class MissingFileError(L2CError, FileNotFoundError):
    """A file or folder the user named (or that an earlier step should have written) is not there."""


class OutputError(L2CError, ValueError):
    """An output folder that cannot be written, or would replace something the toolkit did not write."""


class OutputExistsError(L2CError, FileExistsError):
    """An output that exists and holds something else; the message says how to replace it."""


class CannotRunError(L2CError, RuntimeError):
    """A step that cannot run here or now: a package or GPU it needs is missing (bitsandbytes), another
    process holds its folder, the Hub refuses a push, an evaluation run cannot start or failed."""
