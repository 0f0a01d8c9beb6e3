"""A site's ClientApp executor: each message's ClientApp forked from a process that imported Flower once.

A Flower 1.42 SuperNode runs every message in a fresh ``flwr-clientapp`` process,
started by its SuperExec, which polls the SuperNode's Runtime API for pending
tasks once a second. Before the ClientApp sees the message, that process spends
about a second of CPU importing Python and Flower. :func:`serve` claims the same
tasks through the same API (``AcquireTask``, which hands each task to one
claimant) and runs each in a child forked from this process, which has already
imported Flower and the ClientApp's own modules: the child runs exactly what
``flwr-clientapp`` runs (``flwr.supernode.runtime.run_clientapp``), with the
claimed task's token.

Flower's own SuperExec keeps polling beside it: a task this executor does not
claim first, or every task once it is gone, runs as before. A child watches this
process as a ``flwr-clientapp`` watches its SuperExec; this process exits when
its SuperNode does, ending its children. The parent forks from one thread and
never touches torch, so a child starts clean.

``flwr-nnunet clientapp-exec --runtime-api-address 127.0.0.1:9094 --parent <SuperNode pid>``
(``configs/deployment/supernode.sh`` starts it with the warm site).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from logging import DEBUG, INFO, WARNING
from types import FrameType

import httpx
from flwr.proto.runtime_pb2 import AcquireTaskRequest, AcquireTaskResponse
from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import run_clientapp

import flwr_nnunet.apps.dp_clipping
import flwr_nnunet.apps.packed_messages  # noqa: F401 - with the line above: what client_app.py imports
from flwr_nnunet.site.warm_channel import process_start_ticks

__all__ = ["DEFAULT_POLL_INTERVAL_S", "serve"]

DEFAULT_POLL_INTERVAL_S = 0.2
"""Seconds between two claims (Flower's SuperExec: 1 s). Each is one request to the SuperNode: on the reference
2-core machine an idle executor costs about 1.5% of a core at 0.2 s, and the SuperNode as much again to answer
(measured 2.6% and 4.4% at 0.1 s)."""

STOP_GRACE_S = 10.0
"""Seconds the children get to push their task's status after SIGTERM, when this process stops."""


def _exit_code(status: SystemExit) -> int:
    code = status.code
    return code if isinstance(code, int) else (0 if code is None else 1)


def _run_task(runtime_api_address: str, token: str, certificates: bytes | None) -> None:
    """The forked child: one task, as ``flwr-clientapp`` runs it, then exit (never back into the parent's loop)."""
    code = 1
    try:
        run_clientapp(
            runtime_api_address=runtime_api_address,
            token=token,
            insecure=certificates is None,
            certificates=certificates,
            parent_pid=os.getppid(),
        )
        code = 0
    except SystemExit as status:  # flwr_exit ends every task this way
        code = _exit_code(status)
    except BaseException as error:  # noqa: BLE001 - the child must reach os._exit whatever happened
        log(WARNING, "clientapp-exec: the ClientApp task ended with %r", error)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(children: dict[int, int]) -> None:
    """Collect the children that ended (no zombies), logging a task that did not end cleanly."""
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            task_id = children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            log(DEBUG if code == 0 else WARNING, "clientapp-exec: task %d (pid %d) exited with %d", task_id, pid, code)


def _stop(children: dict[int, int]) -> None:
    """SIGTERM every child still running (each pushes its task's status, as Flower's handlers do), then reap."""
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_GRACE_S
    while children and time.monotonic() < deadline:
        _reap(children)
        time.sleep(0.05)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


def _claim(client: RuntimeHttpClient, request: AcquireTaskRequest) -> AcquireTaskResponse | None:
    """The next pending ClientApp task with its token; None while the SuperNode does not answer (it is starting,
    restarting or gone: the caller checks)."""
    try:
        return client.AcquireTask(request)
    except httpx.HTTPError as error:
        log(DEBUG, "clientapp-exec: no answer from the SuperNode's Runtime API: %s", error)
        return None


def serve(
    runtime_api_address: str,
    parent_pid: int,
    *,
    root_certificates: str | None = None,
    poll_interval: float = DEFAULT_POLL_INTERVAL_S,
) -> None:
    """Claim the SuperNode's ClientApp tasks and run each in a forked child, until ``parent_pid`` (the SuperNode)
    is gone or SIGTERM / SIGINT arrives.

    Parameters
    ----------
    runtime_api_address
        The SuperNode's Runtime API, ``host:port`` (its ``--host`` and ``--port``; 127.0.0.1:9094 by default).
    parent_pid
        The SuperNode's process id: this process and its children end when it does.
    root_certificates
        The CA certificate of a Runtime API served with TLS (SuperNode ``--ssl-certfile``); None: plain HTTP, as
        the SuperNode's own SuperExec connects by default.
    poll_interval
        Seconds between two claims.
    """
    if not poll_interval > 0:
        raise ValueError(f"poll_interval must be positive, got {poll_interval!r}")
    certificates = validate_and_resolve_root_certificates(root_certificates, root_certificates is None)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=certificates is None,
        root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
    )
    stopping = False

    def request_stop(_signal: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    children: dict[int, int] = {}
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    log(INFO, "clientapp-exec: forking the ClientApps of the SuperNode at %s (pid %d)", runtime_api_address, parent_pid)
    parent_started = process_start_ticks(parent_pid)  # the same process, not a later one with its pid
    try:
        while not stopping and parent_started is not None and process_start_ticks(parent_pid) == parent_started:
            _reap(children)
            claimed = _claim(client, request)
            if claimed is not None and claimed.HasField("task") and claimed.token:
                pid = os.fork()
                if pid == 0:
                    _run_task(runtime_api_address, claimed.token, certificates)
                children[pid] = claimed.task.task_id
                log(INFO, "clientapp-exec: task %d forked as pid %d", claimed.task.task_id, pid)
                continue  # another task may be pending
            time.sleep(poll_interval)
    finally:
        client.close()
        _stop(children)
    log(INFO, "clientapp-exec: stopped (%s)", "signal" if stopping else f"SuperNode {parent_pid} is gone")
