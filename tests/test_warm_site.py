"""The warm site: a real worker process keeps the site's trainer; this test process plays the SuperNode.

The ClientApp (``client_app.app``, as Flower calls it) hands each checked instruction to the worker over its
Unix socket; the same instructions answered in-process (node-config ``warm-site=false``) give the same bytes.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from test_client_hardening import Federation, _context, send
from test_site import demo  # noqa: F401 - the module-scoped demo fixture

from flwr_nnunet.apps import client
from flwr_nnunet.core.codec import from_array_record
from flwr_nnunet.site.request import SiteRequest, encode
from flwr_nnunet.site.spec import SiteError, TrainOptions
from flwr_nnunet.site.warm_channel import (
    WarmSiteUnavailable,
    ask_warm_site,
    receive_status,
    send_frame,
    socket_path,
    token_path,
)
from flwr_nnunet.site.warm_worker import log_path, start_warm_site

_RUN_IDS = iter(range(9000, 9100))


def _wait(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError(what)


@pytest.fixture
def worker(tmp_path):
    """A warm worker for ``tmp_path/warm`` bound to this test process; stopped by its pid."""
    results = tmp_path / "warm"
    process = start_warm_site(results, os.getpid())
    try:
        _wait(lambda: socket_path(results).exists(), what=f"the worker's socket\n{_text(log_path(results))}")
        yield results, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def _text(path):
    return path.read_text(errors="replace") if path.is_file() else ""


def _rounds(federation, context, rounds, *, iterations=1, after=None):
    """Train ``rounds`` rounds, each from the last reply's weights (one site: FedAvg keeps them); the replies.

    With node-config ``warm-site=false`` each message finds no live site in this process, as in a fresh
    ``flwr-clientapp`` process: the cold path, rebuilt from the round-state file every round.
    """
    weights, replies = federation.weights, []
    for server_round in rounds:
        if after is not None:
            after(server_round)
        if context.node_config.get("warm-site") is False:
            client._LIVE.clear()
        content = federation.content(server_round, weights=weights, **{"iterations-per-epoch": iterations})
        reply = send("train", content, context)
        assert not reply.has_error(), reply.error.reason
        replies.append(reply)
        weights = {key: value.clone() for key, value in from_array_record(reply.content["arrays"]).items()}
    return replies


def _assert_same(warm, cold):
    for warm_reply, cold_reply in zip(warm, cold, strict=True):
        warm_arrays, cold_arrays = (from_array_record(r.content["arrays"]) for r in (warm_reply, cold_reply))
        assert warm_arrays.keys() == cold_arrays.keys()
        for key in warm_arrays:
            assert torch.equal(warm_arrays[key], cold_arrays[key]), key
        assert dict(warm_reply.content["metrics"]) == dict(cold_reply.content["metrics"])


@pytest.mark.slow
def test_warm_rounds_equal_cold_rounds_bit_for_bit(demo, tmp_path, worker):  # noqa: F811
    results, _ = worker
    federation = Federation(demo)
    run_id = next(_RUN_IDS)
    warm = _rounds(federation, _context(demo, results, run_id), range(1, 4))
    cold = _rounds(federation, _context(demo, tmp_path / "cold", run_id, **{"warm-site": False}), range(1, 4))
    _assert_same(warm, cold)
    log = _text(log_path(results))
    assert "a fresh trainer for run" in log and "site-0: round 3 trained" in log, log  # the worker trained them
    assert "trainer rebuilt" not in log  # ... on one live trainer


@pytest.mark.slow
def test_a_worker_killed_mid_round_is_answered_in_process_with_the_same_result(demo, tmp_path, worker, caplog):  # noqa: F811
    results, process = worker
    federation = Federation(demo)
    run_id = next(_RUN_IDS)
    training_logs = results / demo.dataset_name

    def kill_during_round_2(server_round):
        if server_round != 2:
            return

        def kill_once_training():
            _wait(lambda: any("Epoch 1" in _text(p) for p in training_logs.rglob("training_log_*.txt")), 120, "epoch 1")
            process.kill()

        threading.Thread(target=kill_once_training, daemon=True).start()

    with caplog.at_level("INFO"):
        warm = _rounds(
            federation, _context(demo, results, run_id), range(1, 3), iterations=4, after=kill_during_round_2
        )
    assert process.poll() is not None and "ended before it answered" in caplog.text  # killed during round 2
    assert "this message is answered in-process" in caplog.text
    cold_context = _context(demo, tmp_path / "cold", run_id, **{"warm-site": False})
    _assert_same(warm, _rounds(federation, cold_context, range(1, 3), iterations=4))


@pytest.mark.slow
def test_a_stranger_is_refused(demo, tmp_path, worker):  # noqa: F811
    results, _ = worker
    for path in (socket_path(results), token_path(results)):
        mode = os.stat(path).st_mode
        assert stat.S_IMODE(mode) == 0o600 and os.stat(path).st_uid == os.getuid(), (path, oct(mode))
    if socket_path(results).is_socket():  # no other user may connect: the socket is its owner's alone
        assert not os.stat(socket_path(results)).st_mode & (stat.S_IRWXG | stat.S_IRWXO)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # the right path, a wrong token
        sock.connect(str(socket_path(results)))
        send_frame(sock, b"0" * 64)
        assert receive_status(sock) == ("refused", "wrong token")
    assert "refused a connection with a wrong token" in _text(log_path(results))

    options = TrainOptions(server_round=1, iterations_per_epoch=1, val_iterations_per_epoch=1)
    spec = _spec_for(demo, tmp_path / "elsewhere")
    stranger = SiteRequest("train", 1, spec, options, Federation(demo).weights)
    with pytest.raises(WarmSiteUnavailable, match="no warm site runs"):  # a wrong path: nothing listens there
        ask_warm_site(stranger)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # the right token, another site's folder
        sock.connect(str(socket_path(results)))
        send_frame(sock, token_path(results).read_bytes())
        assert receive_status(sock)[0] == "ready"
        send_frame(sock, encode(stranger))
        status, reason = receive_status(sock)
    assert status == "refused" and f"this warm site serves {results}" in reason
    assert not (tmp_path / "elsewhere").exists()

    os.chmod(token_path(results), 0o644)  # a token others could read: the ClientApp does not use it
    with pytest.raises(WarmSiteUnavailable, match="open to other users"):
        ask_warm_site(SiteRequest("train", 1, _spec_for(demo, results), options, Federation(demo).weights))
    os.chmod(token_path(results), 0o600)
    with pytest.raises(SiteError, match="the server's model is not finite"):  # refused by the site, as in-process
        bad = {
            key: torch.full_like(value, float("nan")) if value.is_floating_point() else value
            for key, value in Federation(demo).weights.items()
        }
        ask_warm_site(SiteRequest("train", 1, _spec_for(demo, results), options, bad))


def _spec_for(demo, results):  # noqa: F811
    from test_site import spec_for

    return spec_for(demo, results)


def test_the_worker_ends_with_its_supernode_and_when_idle(tmp_path):
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        results = tmp_path / "site"
        process = start_warm_site(results, supernode.pid)
        _wait(lambda: socket_path(results).exists(), what=_text(log_path(results)))
        supernode.kill()  # not reaped yet: a zombie, as a SuperNode whose parent has not waited for it
        process.wait(timeout=30)  # gone within a tick of its SuperNode
        supernode.wait()
        assert not socket_path(results).exists() and not token_path(results).exists()

        idle = subprocess.Popen(
            [sys.executable, "-m", "flwr_nnunet.site.warm_worker", "--results", str(tmp_path / "idle"),
             "--parent", str(os.getpid()), "--idle-timeout", "1"],
        )  # fmt: skip
        idle.wait(timeout=60)
        assert idle.returncode == 0 and not socket_path(tmp_path / "idle").exists()
    finally:
        if supernode.poll() is None:
            supernode.kill()
