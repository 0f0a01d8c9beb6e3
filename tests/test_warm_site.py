"""The warm site: a real worker process keeps the site's trainer; this test process plays the SuperNode.

The ClientApp (``client_app.app``, as Flower calls it) hands each message, unread, to the worker over its Unix
socket; the worker checks and answers it, and the same instructions answered in-process (node-config
``warm-site=false``) give the same bytes. A ClientApp process whose worker answers never imports torch.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.app.message.message import make_message
from test_client_hardening import REPO, Federation, _context, _metadata, send
from test_site import demo  # noqa: F401 - the module-scoped demo fixture

from flwr_nnunet.apps import client
from flwr_nnunet.apps.warm_forwarding import decode_content, encode_forwarded, forwarded
from flwr_nnunet.core.codec import from_array_record
from flwr_nnunet.site.warm_channel import (
    WORKER_COMMAND,
    WarmSiteRefused,
    WarmSiteUnavailable,
    ask_warm_site,
    log_path,
    receive_status,
    send_frame,
    socket_path,
    start_warm_site,
    token_path,
)
from flwr_nnunet.site.warm_worker import WarmWorker

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
    _wait(lambda: any(results.rglob("progress.png")), what="the progress plot the worker draws after its replies")


@pytest.mark.slow
def test_the_worker_draws_a_rounds_progress_plot_after_its_reply(demo, tmp_path):  # noqa: F811
    results = tmp_path / "warm"
    worker = WarmWorker(results, b"token", client.answer_forwarded)
    message = make_message(_metadata("train"), content=Federation(demo).content(1))
    answer = worker.answer(encode_forwarded(message, _context(demo, results, next(_RUN_IDS))), worker.site_for)
    spec = worker.site.spec
    assert decode_content(answer)["metrics"]["epoch"] == 1 and spec.state_file.is_file()  # the round is answered
    assert not (spec.output_folder / "progress.png").exists()  # ... and its reply did not wait for the plot
    worker.draw_plots()
    assert (spec.output_folder / "progress.png").is_file()


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

    federation = Federation(demo)
    run_id = next(_RUN_IDS)

    def frames(results_of_request, **weights):
        message = make_message(_metadata("train"), content=federation.content(1, **weights))
        return encode_forwarded(message, _context(demo, results_of_request, run_id))

    with pytest.raises(WarmSiteUnavailable, match="no warm site runs"):  # a wrong path: nothing listens there
        ask_warm_site(tmp_path / "elsewhere", frames(tmp_path / "elsewhere"))
    with pytest.raises(
        WarmSiteRefused, match=re.escape(f"this warm site serves {results}")
    ):  # the right token, another site
        ask_warm_site(results, frames(tmp_path / "elsewhere"))
    assert not (tmp_path / "elsewhere").exists()

    os.chmod(token_path(results), 0o644)  # a token others could read: the ClientApp does not use it
    with pytest.raises(WarmSiteUnavailable, match="open to other users"):
        ask_warm_site(results, frames(results))
    os.chmod(token_path(results), 0o600)
    nan = {
        key: torch.full_like(value, float("nan")) if value.is_floating_point() else value
        for key, value in federation.weights.items()
    }
    with pytest.raises(WarmSiteRefused, match="the server's model is not finite"):  # refused by the site, as in-process
        ask_warm_site(results, frames(results, weights=nan))


_FORWARD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import client_app
from flwr_nnunet.apps.warm_forwarding import decode_forwarded

message, context = decode_forwarded([open(path, "rb").read() for path in sys.argv[2:]])
reply = client_app.app(message, context)
print(json.dumps({
    "error": reply.error.reason if reply.has_error() else None,
    "records": sorted(reply.content.keys()) if reply.has_content() else [],
    "heavy": sorted(name for name in ("torch", "nnunetv2") if name in sys.modules),
}))
"""


@pytest.mark.slow
def test_a_clientapp_whose_worker_answers_imports_neither_torch_nor_nnunet(demo, tmp_path, worker):  # noqa: F811
    results, _ = worker
    message = make_message(_metadata("train"), content=Federation(demo).content(1))
    paths = [tmp_path / "context.pb", tmp_path / "message.pb"]
    for path, frame in zip(paths, encode_forwarded(message, _context(demo, results, next(_RUN_IDS))), strict=True):
        path.write_bytes(frame)
    done = subprocess.run(
        [sys.executable, "-c", _FORWARD, str(REPO), *map(str, paths)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    assert reply == {"error": None, "records": ["arrays", "config", "metrics"], "heavy": []}, done.stderr
    assert "site-0: round 1 trained" in _text(log_path(results))  # the worker trained it


def test_the_clientapp_asks_a_worker_only_where_one_may_answer(tmp_path):
    message = make_message(_metadata("train"), content=RecordDict())

    def context(**node_config):
        node_config = {"nnunet-results": str(tmp_path), **node_config}
        return Context(run_id=1, node_id=2, node_config=node_config, state=RecordDict(), run_config={})

    assert forwarded(message, context(**{"partition-id": 0})) is None  # a simulation's site lives in its actor
    assert forwarded(message, context(**{"warm-site": False})) is None
    assert forwarded(message, context()) is None  # no worker runs: answered in-process
    refused = forwarded(message, context(**{"warm-site": "maybe"}))
    assert refused.has_error() and "node-config 'warm-site' must be true or false, not 'maybe'" in refused.error.reason
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


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
            [sys.executable, *WORKER_COMMAND, "--results", str(tmp_path / "idle"),
             "--parent", str(os.getpid()), "--idle-timeout", "1"],
        )  # fmt: skip
        idle.wait(timeout=60)
        assert idle.returncode == 0 and not socket_path(tmp_path / "idle").exists()
    finally:
        if supernode.poll() is None:
            supernode.kill()
