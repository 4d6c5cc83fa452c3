"""The one error type for user mistakes.

A bad config, a missing cache or a checkpoint that does not fit is the user's to fix, so it is reported as
plain lines naming the thing (exit code 2), never as a traceback. Several problems found in one check are
carried together so the user can fix them all in one go.
"""

from __future__ import annotations

import difflib
import os
import signal
import sys
from collections.abc import Iterable

USER_ERROR_EXIT = 2
CTRL_C_EXIT = 128 + signal.SIGINT  # what a shell reports for a command stopped by Ctrl-C


class UserError(Exception):
    """A problem with the user's inputs; each entry of `problems` is one line naming the culprit."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def raise_if_any(problems: list[str]) -> None:
    if problems:
        raise UserError(problems)


def exit_with(main) -> None:
    """`sys.exit(main())` for a CLI whose output may go into a pipe that closes early (`runs show X | head`):
    the reader has what it wanted, so no BrokenPipeError traceback; exit 141 as a shell's own commands do. Ctrl-C
    is one line and exit 130, not a KeyboardInterrupt traceback (`run` handles it itself: it saves, then stops)."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout again at exit
        code = 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        print("\nstopped: interrupted (Ctrl-C)", file=sys.stderr)
        code = CTRL_C_EXIT
    sys.exit(code)


def report(e: UserError) -> int:
    """What every CLI does with a UserError: one `error:` line per problem on stderr, exit code 2."""
    for line in e.problems:
        print(f"error: {line}", file=sys.stderr)
    return USER_ERROR_EXIT


def unknown_key_message(where: str, key: str, known: Iterable[str]) -> str:
    """`where.key: unknown key (did you mean 'x'?)`, or the known keys when none is close."""
    near = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(sorted(known))})"
    return f"{where}.{key}: unknown key{hint}"


def first_line(e: BaseException) -> str:
    """An exception as one line for an error message: its type and the first line of its text, if it has any (an
    empty .pt's EOFError has none, and `str(e).splitlines()[0]` raised an IndexError in the handler itself)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
