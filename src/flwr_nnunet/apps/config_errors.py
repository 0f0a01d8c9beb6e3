"""Run-config errors of the ServerApp: one log line naming the problem and the fix, no traceback.

A :class:`ServerConfigError` is the user's to fix, not a bug. Flower logs an
exception out of the ServerApp with its traceback and an exit-code footer;
:func:`install_one_line_errors` keeps one line of it instead.
"""

from __future__ import annotations

import json
import logging
from logging import ERROR
from pathlib import Path
from typing import Any

from flwr.app.exception import AppExitException
from flwr.supercore import log
from flwr.supercore.exit import ExitCode

from flwr_nnunet.errors import FlwrNnUNetError

__all__ = ["ServerConfigError", "install_one_line_errors", "read_required_json"]


class ServerConfigError(FlwrNnUNetError, AppExitException, ValueError):
    """A run config the server cannot run with (the user's to fix, not a bug): one line, the problem and the fix.

    Raised out of the ServerApp it fails the run (status ``finished:failed``; a
    ``flwr-serverapp`` process exits non-zero). :func:`run_server` logs it as that
    one line, and :func:`install_one_line_errors` keeps Flower from logging it
    again with its traceback.
    """

    exit_code = ExitCode.SERVERAPP_EXCEPTION
    reported = False
    """Set once the one line is in Flower's log."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def read_required_json(path: Path, fix: str) -> dict:
    """The JSON file at ``path``; a :class:`ServerConfigError` naming it and ``fix`` when it is missing."""
    if not path.is_file():
        raise ServerConfigError(f"{path} not found; {fix}")
    return json.loads(path.read_text())


def _config_error(exc_info: Any) -> ServerConfigError | None:
    """The :class:`ServerConfigError` a log record's exception is, or was raised from (None if none)."""
    error = exc_info[1] if isinstance(exc_info, tuple) else None
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ServerConfigError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class _OneLineConfigErrors(logging.Filter):
    """Flower logs an exception out of the ServerApp with its traceback, then an exit-code footer.

    For a :class:`ServerConfigError` this keeps one line: ``flwr-nnunet: <problem>; <fix>`` (none when
    :meth:`report` already logged it). Every other record (and every other exception, with its traceback)
    passes unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reported = False

    def report(self, error: ServerConfigError) -> None:
        """Log ``error`` as its one line now (a simulation run from Python logs nothing of the ServerApp's error)."""
        log(ERROR, "flwr-nnunet: %s", error)
        error.reported = self.reported = True

    def filter(self, record: logging.LogRecord) -> bool:
        error = _config_error(record.exc_info)
        if error is not None:
            self.reported = True
            if error.reported:
                return False
            record.msg, record.args = "flwr-nnunet: %s", (str(error),)
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            error.reported = True
            return True
        return not (self.reported and str(record.msg).startswith("Exit Code:"))


def install_one_line_errors(logger: logging.Logger | None = None) -> _OneLineConfigErrors:
    """Make Flower's logger (``flwr``) report a :class:`ServerConfigError` as one line; idempotent."""
    logger = logger or logging.getLogger("flwr")
    for existing in logger.filters:
        if isinstance(existing, _OneLineConfigErrors):
            return existing
    installed = _OneLineConfigErrors()
    logger.addFilter(installed)
    return installed
