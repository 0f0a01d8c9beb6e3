"""Children forked by a Flower app process start with Python's default signal handlers, not Flower's.

Flower 1.42's ServerApp (and ClientApp) process handles SIGINT, SIGTERM and SIGQUIT by pushing its task's final
status with the task's token, then exiting (``flwr.supercore.exit.register_signal_handlers``). A child made by
``fork`` inherits those handlers. nnU-Net's experiment planner forks a ``multiprocessing.Pool`` (in
``get_filenames_of_train_images_and_targets``) and leaving the pool sends SIGTERM to the workers still alive:
such a worker reported the ServerApp's task as failed, the SuperLink ended the run, and the ServerApp's next
call, the plans query, was refused ("Runtime task-token authentication failed"). Whether a worker was still
alive was a race, lost more often on a busy machine.
"""

from __future__ import annotations

import os
import signal

__all__ = ["default_signals_in_forked_children"]

_registered = False


def _restore_default_signals() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def default_signals_in_forked_children() -> None:
    """From now on every child this process forks starts with Python's default SIGINT, SIGTERM and SIGQUIT
    handlers, so only the process that holds the Flower task reports its end. Registered once per process."""
    global _registered
    if not _registered:
        os.register_at_fork(after_in_child=_restore_default_signals)
        _registered = True
