"""The local channel to a site's warm worker: its files, its frames, and the ClientApp's side of a message.

The worker (:mod:`flwr_nnunet.site.warm_worker`) listens on a Unix socket in the
site's results folder (``<nnunet-results>/flwr_warm_site.sock``, mode 0600) and
writes a random token beside it (``flwr_warm_site.token``, mode 0600): only the
site's own user can open either. A connection sends the token first, then the
message's frames (:mod:`flwr_nnunet.apps.warm_forwarding` writes them: Flower's own
protobuf); the worker answers with a status and the reply's bytes. Each part is a
frame: an 8-byte length, then the bytes. Nothing crosses as a pickle.

:func:`ask_warm_site` raises :class:`WarmSiteUnavailable` whenever the worker
cannot take the message (none runs, it is busy, it refused this process, it
ended during the round): the ClientApp then answers in its own process. This
module imports neither torch nor nnU-Net: a ClientApp whose worker answers never
does.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr_nnunet.errors import FlwrNnUNetError

__all__ = [
    "HANDSHAKE_TIMEOUT_S",
    "MAX_TOKEN_BYTES",
    "WORKER_COMMAND",
    "WarmSiteBusy",
    "WarmSiteRefused",
    "WarmSiteUnavailable",
    "ask_warm_site",
    "log_path",
    "private_file",
    "process_start_ticks",
    "receive_frame",
    "receive_frames",
    "receive_status",
    "send_frame",
    "send_status",
    "socket_path",
    "start_warm_site",
    "supernode_pid",
    "token_path",
]

HANDSHAKE_TIMEOUT_S = 10.0
"""How long either side waits for the token or the worker's first status."""
MAX_TOKEN_BYTES = 256
MAX_FRAME_BYTES = 1 << 40
_LENGTH_BYTES = 8
_SOCKET_NAME, _TOKEN_NAME, _LOG_NAME = "flwr_warm_site.sock", "flwr_warm_site.token", "flwr_warm_site.log"
WORKER_COMMAND = ("-m", "flwr_nnunet.cli", "warm-site")
"""How Python starts a worker (``flwr-nnunet warm-site --results DIR --parent PID``)."""


class WarmSiteUnavailable(FlwrNnUNetError):
    """The site's warm worker cannot take this message; the ClientApp answers it in its own process."""


class WarmSiteBusy(WarmSiteUnavailable):
    """The site's warm worker is answering another message (of another run)."""


class WarmSiteRefused(FlwrNnUNetError):
    """The site refused the instruction (its reason, as the ClientApp's process would have refused it)."""


def process_start_ticks(pid: int) -> int | None:
    """A live process's start time (clock ticks since boot), ``None`` once it is gone: exited and not yet reaped
    (a zombie) counts as gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def socket_path(results: Path) -> Path:
    """The warm worker's socket in the site's results folder."""
    return Path(results) / _SOCKET_NAME


def token_path(results: Path) -> Path:
    """The warm worker's token file beside its socket."""
    return Path(results) / _TOKEN_NAME


def log_path(results: Path) -> Path:
    """Where a worker started on first use writes its log (beside its socket)."""
    return Path(results) / _LOG_NAME


def supernode_pid() -> int:
    """The pid of the SuperNode above this process (``flower-supernode`` among its ancestors), else its parent."""
    pid = os.getppid()
    while pid > 1:
        with contextlib.suppress(OSError):
            if b"flower-supernode" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return os.getppid()


def start_warm_site(results: Path, parent: int) -> subprocess.Popen:
    """Start a worker for the site whose results folder is ``results``, in its own session, bound to ``parent``
    (it exits when ``parent`` does), its log in :func:`log_path`."""
    Path(results).mkdir(parents=True, exist_ok=True)
    command = [sys.executable, *WORKER_COMMAND, "--results", str(results), "--parent", str(parent)]
    with open(log_path(results), "ab") as out:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def private_file(path: Path) -> bool:
    """Whether ``path`` belongs to this process's user and no one else may read or write it (mode 0600 or less)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return info.st_uid == os.getuid() and not stat.S_IMODE(info.st_mode) & 0o077


def send_frame(sock: socket.socket, data: bytes) -> None:
    """Send ``data`` as one frame."""
    sock.sendall(len(data).to_bytes(_LENGTH_BYTES, "big"))
    sock.sendall(data)


def _exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, done = memoryview(buffer), 0
    while done < size:
        got = sock.recv_into(view[done:], size - done)
        if got == 0:
            raise ConnectionError(f"the other side closed the channel after {done} of {size} bytes")
        done += got
    return bytes(buffer)


def receive_frame(sock: socket.socket, limit: int = MAX_FRAME_BYTES) -> bytes:
    """One frame's bytes.

    Raises
    ------
    ConnectionError
        If the channel closes first, or the frame is longer than ``limit``.
    """
    size = int.from_bytes(_exactly(sock, _LENGTH_BYTES), "big")
    if size > limit:
        raise ConnectionError(f"a frame of {size} bytes, more than the {limit} expected")
    return _exactly(sock, size)


def send_status(sock: socket.socket, status: str, reason: str = "") -> None:
    """Send a status frame (``ready``, ``busy``, ``refused``, ``failed``, ``answer``) with its reason."""
    send_frame(sock, json.dumps({"status": status, "reason": reason}).encode())


def receive_status(sock: socket.socket) -> tuple[str, str]:
    """(status, reason) of a status frame."""
    entries: Any = json.loads(receive_frame(sock, 1 << 20))
    return str(entries["status"]), str(entries.get("reason", ""))


def ask_warm_site(results: Path, frames: Sequence[bytes]) -> bytes:
    """The answer of the warm worker of the site whose results folder is ``results`` to a message's ``frames``.

    Raises
    ------
    WarmSiteUnavailable
        If no worker runs for ``results``, its socket or token is not private to this user, it is busy, it refuses
        this process, or it ends before it answers.
    WarmSiteRefused
        The site's refusal of the instruction (as the ClientApp's process would refuse it).
    """
    path, token_file = socket_path(results), token_path(results)
    if not path.exists():
        raise WarmSiteUnavailable(f"no warm site runs ({path} not found)")
    for file in (path, token_file):
        if not private_file(file):
            raise WarmSiteUnavailable(f"{file} is missing, or open to other users than this one: not used")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            sock.connect(str(path))
            send_frame(sock, token_file.read_bytes())
            status, reason = receive_status(sock)
            if status != "ready":
                unavailable = WarmSiteBusy if status == "busy" else WarmSiteUnavailable
                raise unavailable(f"the warm site at {path} is {status}{': ' + reason if reason else ''}")
            sock.settimeout(None)
            send_frame(sock, len(frames).to_bytes(_LENGTH_BYTES, "big"))
            for frame in frames:
                send_frame(sock, frame)
            status, reason = receive_status(sock)
            data = receive_frame(sock) if status == "answer" else b""
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise WarmSiteUnavailable(f"the warm site at {path} ended before it answered ({error})") from None
    if status == "refused":
        raise WarmSiteRefused(reason)
    if status != "answer":
        raise WarmSiteUnavailable(f"the warm site at {path} failed: {reason}")
    return data


def receive_frames(sock: socket.socket, limit: int = 16) -> list[bytes]:
    """The frames :func:`ask_warm_site` sent: their count, then each.

    Raises
    ------
    ConnectionError
        If the channel closes first, or more than ``limit`` frames are announced.
    """
    count = int.from_bytes(receive_frame(sock, _LENGTH_BYTES), "big")
    if count > limit:
        raise ConnectionError(f"{count} frames announced, more than the {limit} expected")
    return [receive_frame(sock) for _ in range(count)]
