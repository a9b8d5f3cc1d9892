"""The one family of errors that a user's input or environment causes, and how the CLIs report it.

Config, data, weights, checkpoint-directory and command-line problems all raise a subclass of UserError:
`python -m pf_jax.train` (and `eval`, `generate`) print its message on one line, plus a hint where there is
one, and exit with code 2. Any other exception is a bug of ours and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USER_ERROR_EXIT_CODE = 2


class UserError(ValueError):
    """A problem the user can fix (input, recipe or environment); `hint` says how, when we know."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(UserError):
    """A config file, override or value that does not fit the schema; the message names the key."""


class RunStorageError(UserError):
    """The run directory cannot be written (read-only, full disk): names the path and the OS error."""


def one_line(error: UserError) -> str:
    """The message as one line: the error's own lines joined, then its hint."""
    text = ""
    for part in (p.strip() for p in str(error).splitlines()):
        if part:
            text += part if not text else (" " if text.endswith(":") else "; ") + part
    return f"{text} (hint: {error.hint})" if error.hint else text


def exit_code_of(prog: str, run: Callable[[], int | None]) -> int:
    """run() -> its exit code (0 for None); a UserError is printed as `<prog>: <message>` on stderr and
    gives USER_ERROR_EXIT_CODE. Other exceptions propagate with their traceback."""
    try:
        code = run()
    except UserError as error:
        print(f"{prog}: {one_line(error)}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return 0 if code is None else int(code)
