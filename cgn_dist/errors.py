"""The project's own error types for a mistake in the input or the machine (never a bug in cgn_dist).

The CLI prints these as one line and exits 2; anything else keeps its traceback, so a real bug is never
mistaken for a user's mistake. Each type also derives from the builtin it replaces, so code (and tests)
catching ``ValueError`` / ``FileNotFoundError`` / ``RuntimeError`` keep working. This module imports
nothing of the project: every layer may raise these.
"""
from __future__ import annotations

import errno


class UserError(Exception):
    """The input (config, a file, a folder) or the machine is wrong; the message names what and the fix."""


class InputError(UserError, ValueError):
    """A value, a file or a folder the user gave is not what the command needs."""


class InputNotFound(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or lacks the part the command reads)."""


class SetupError(UserError, RuntimeError):
    """The machine or an output folder is not in a state the command can use (no GPU, a changed listing)."""


class DownloadError(UserError, ConnectionError):
    """A file the command needs is not here and cannot be downloaded (offline, a proxy, the server down)."""


# Errors of the machine, not of cgn_dist: a full disk, a read-only mount, no permission. A bug in the code
# does not produce these, so the CLI reports them in one line like a UserError.
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def is_machine_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in MACHINE_ERRNOS
