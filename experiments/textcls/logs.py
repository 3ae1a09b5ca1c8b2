"""Logging and error reporting for the command-line entry points."""

from __future__ import annotations

import logging as std_logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from absl import logging

from experiments.textcls.checkpoint import DamagedCheckpointError

T = TypeVar("T")

#: What a user can cause and fix (a bad config value, a data file, a workdir, a damaged
#: checkpoint): each message says what and where, so a traceback would only bury it.
USER_ERRORS = (ValueError, TypeError, OSError, DamagedCheckpointError)


def exit_on_user_error(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``; a :data:`USER_ERRORS` exits with one ``error: ...`` line (status 1),
    its traceback only with ``JAXBAG_TRACEBACK=1`` (for a bug).

    A failed checkpoint read leaves tensorstore callbacks that reach orbax's closed event loop
    ("Event loop is closed", reported through :func:`sys.unraisablehook` from another thread,
    before or after the error reaches us). So while ``fn`` runs, such reports are held back:
    after a user error they are dropped (shown with ``JAXBAG_TRACEBACK=1``) and the process exits
    at once (``os._exit``, after flushing both streams; the run's files are written atomically,
    so nothing is left half-done), as the interpreter's teardown would print more of them.
    Otherwise they go to the previous hook once ``fn`` returns or raises."""
    held: list[Any] = []
    previous = sys.unraisablehook
    sys.unraisablehook = held.append

    def release() -> None:
        sys.unraisablehook = previous
        for report in held:
            previous(report)

    try:
        result = fn(*args)
    except USER_ERRORS as e:
        if os.environ.get("JAXBAG_TRACEBACK"):
            release()
            raise
        print(f"error: {e}\n(JAXBAG_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except BaseException:
        release()
        raise
    release()
    return result


def quiet_orbax(min_level: int = std_logging.WARNING) -> None:
    """Drops orbax-checkpoint records below ``min_level`` (it logs a dozen INFO lines
    per checkpoint) from the absl log, keeping everything else."""

    def keep(record: std_logging.LogRecord) -> bool:
        return record.levelno >= min_level or "orbax" not in record.pathname

    logging.get_absl_handler().addFilter(keep)
