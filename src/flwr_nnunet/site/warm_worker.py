"""A site's warm worker: one long-lived process that keeps the site's trainer across a run's messages.

A Flower 1.42 SuperNode starts a fresh ClientApp process per message, which
would import torch and nnU-Net, build the trainer and start its data loaders
every round. The warm worker does that once: it keeps one
:class:`~flwr_nnunet.site.site.Site` (network, optimizer, data loaders) per run
and answers each message the ClientApp hands it over the local channel
(:mod:`flwr_nnunet.site.warm_channel`), with the answer function it serves
(the ClientApp's own checks and reply: ``flwr_nnunet.apps.client.answer_forwarded``).
A new run, another fold or other settings get a fresh trainer; the round-state
file stays the one truth, so a round answered here trains exactly as one
answered in the ClientApp's process.

``flwr-nnunet warm-site --results <nnunet-results> --parent <SuperNode pid>``
(``configs/deployment/supernode.sh`` starts it; the ClientApp starts it on first
use with node-config ``warm-site=true``). It serves one message at a time (a
second one is told it is busy), refuses a wrong token or another user, and
exits, freeing its memory, when its SuperNode is gone or nothing came for
``--idle-timeout`` seconds.
"""

from __future__ import annotations

import fcntl
import gc
import hmac
import os
import secrets
import socket
import struct
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from logging import ERROR, INFO, WARNING
from pathlib import Path

import torch
from flwr.supercore import log

from flwr_nnunet.site.request import SiteRequest
from flwr_nnunet.site.site import Site
from flwr_nnunet.site.spec import SiteError, SiteSpec
from flwr_nnunet.site.warm_channel import (
    HANDSHAKE_TIMEOUT_S,
    MAX_TOKEN_BYTES,
    WarmSiteRefused,
    process_start_ticks,
    receive_frame,
    receive_frames,
    send_frame,
    send_status,
    socket_path,
    token_path,
)

__all__ = ["DEFAULT_IDLE_TIMEOUT_S", "Answer", "WarmWorker", "serve"]

Answer = Callable[[list[bytes], Callable[[SiteRequest], Site]], bytes]
"""What a worker serves: a message's frames and the site for a checked request -> the reply's bytes; raises
:class:`~flwr_nnunet.site.warm_channel.WarmSiteRefused` for a refused instruction."""

DEFAULT_IDLE_TIMEOUT_S = 3600.0
"""A worker with no message for this long exits (the next message trains in the ClientApp's process)."""
_TICK_S = 0.5
_MAX_SOCKET_PATH_BYTES = 107
"""Linux's limit on a Unix socket's path (``sun_path`` holds 108 bytes with the terminating zero)."""
_LOCK_NAME = "flwr_warm_site.lock"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``path`` readable and writable by this user only (mode 0600 from its creation)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(data)


def _peer_uid(connection: socket.socket) -> int | None:
    """The connecting process's user id (Linux ``SO_PEERCRED``), ``None`` where the system does not say."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    _, uid, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    return uid


class WarmWorker:
    """The worker's state: its token, the one message it answers at a time, and the site of the current run.

    Parameters
    ----------
    results
        The site's results folder (node-config ``nnunet-results``): requests for another site are refused.
    token
        The bytes a connection must send first.
    answer
        The answer to a message's frames.
    """

    def __init__(self, results: Path, token: bytes, answer: Answer):
        self.results = Path(results).absolute()
        self.token, self.answer = token, answer
        self.busy = threading.Lock()
        self.last_message = time.monotonic()
        self.site: Site | None = None
        self._key: tuple[int, SiteSpec] | None = None
        self._plots: deque[Callable[[], None]] = deque()
        self._plotting = threading.Lock()

    def site_for(self, request: SiteRequest) -> Site:
        """The live site of ``request``'s run and spec; a fresh one (the previous one dropped) for another.

        Raises
        ------
        SiteError
            If ``request`` is for another site's results folder than the one this worker serves.
        """
        if Path(request.spec.nnunet_results).absolute() != self.results:
            raise SiteError(
                f"{request.spec.name}: this warm site serves {self.results}, not {request.spec.nnunet_results}"
            )
        key = (request.run_id, request.spec)
        if self.site is None or key != self._key:
            self.drop_site()
            log(INFO, "%s: warm site: a fresh trainer for run %d", request.spec.name, request.run_id)
            self.site, self._key = Site(request.spec, plot_later=self._plots.append), key
        return self.site

    def drop_site(self) -> None:
        """Forget the live site and free its memory (the GPU's too)."""
        self.site, self._key = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def handle(self, connection: socket.socket) -> None:
        """Answer one connection: the token, then one request; then, the connection closed, draw the round's
        progress plot (off the round's way, the next message served meanwhile). No exception leaves."""
        try:
            with connection:
                connection.settimeout(HANDSHAKE_TIMEOUT_S)
                self._handle(connection)
        except (OSError, ConnectionError) as error:
            log(WARNING, "warm site: a connection ended early (%s)", error)
        self.draw_plots()

    def draw_plots(self) -> None:
        """Draw the progress plots that answered rounds left (nnU-Net's ``progress.png``), one at a time; a plot
        that fails is logged."""
        with self._plotting:
            while self._plots:
                try:
                    self._plots.popleft()()
                except Exception as error:  # noqa: BLE001 - a plot is no part of the round's answer
                    log(WARNING, "warm site: a progress plot failed\n%s", "".join(traceback.format_exception(error)))

    def _handle(self, connection: socket.socket) -> None:
        uid = _peer_uid(connection)
        if uid is not None and uid != os.getuid():
            log(WARNING, "warm site: refused a connection of user %d", uid)
            send_status(connection, "refused", "another user")
            return
        if not hmac.compare_digest(receive_frame(connection, MAX_TOKEN_BYTES), self.token):
            log(WARNING, "warm site: refused a connection with a wrong token")
            send_status(connection, "refused", "wrong token")
            return
        if not self.busy.acquire(blocking=False):
            send_status(connection, "busy", "answering another message")
            return
        try:
            send_status(connection, "ready")
            connection.settimeout(None)
            frames = receive_frames(connection)
            self.last_message = time.monotonic()
            self._answer(connection, frames)
        finally:
            self.last_message = time.monotonic()
            self.busy.release()

    def _answer(self, connection: socket.socket, frames: list[bytes]) -> None:
        try:
            answer = self.answer(frames, self.site_for)
        except WarmSiteRefused as refusal:
            send_status(connection, "refused", str(refusal))
            return
        except Exception as error:  # noqa: BLE001 - the ClientApp answers in-process; logged with its traceback
            log(ERROR, "warm site: unexpected error\n%s", "".join(traceback.format_exception(error)))
            send_status(connection, "failed", f"unexpected {type(error).__name__}: {error}")
            return
        send_status(connection, "answer")
        send_frame(connection, answer)


def serve(results: Path, parent: int, answer: Answer, idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S) -> None:
    """Serve ``answer`` for the site whose results folder is ``results`` until ``parent`` is gone or
    ``idle_timeout`` seconds pass without a message; return at once if another worker serves it."""
    results = Path(results).absolute()
    results.mkdir(parents=True, exist_ok=True)
    with open(results / _LOCK_NAME, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log(INFO, "warm site: another worker serves %s", results)
            return
        _serve(results, parent, answer, idle_timeout)


def _serve(results: Path, parent: int, answer: Answer, idle_timeout: float) -> None:
    path, token = socket_path(results), secrets.token_hex(32).encode()
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH_BYTES:
        log(ERROR, "warm site: %s is longer than a Unix socket path may be; use a shorter nnunet-results", path)
        return
    parent_started = process_start_ticks(parent)
    _write_private(token_path(results), token)
    path.unlink(missing_ok=True)
    worker = WarmWorker(results, token, answer)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        mask = os.umask(0o177)
        try:
            listener.bind(str(path))
        finally:
            os.umask(mask)
        os.chmod(path, 0o600)
        listener.listen(8)
        listener.settimeout(_TICK_S)
        log(INFO, "warm site: serving %s (pid %d, SuperNode pid %d)", path, os.getpid(), parent)
        try:
            while parent_started is not None and process_start_ticks(parent) == parent_started:
                idle = not worker.busy.locked() and time.monotonic() - worker.last_message > idle_timeout
                if idle:
                    log(INFO, "warm site: no message for %.0f s: exiting", idle_timeout)
                    break
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=worker.handle, args=(connection,), daemon=True).start()
        finally:
            path.unlink(missing_ok=True)
            token_path(results).unlink(missing_ok=True)
            worker.draw_plots()
            worker.drop_site()
    log(INFO, "warm site: stopped (%s)", path)
