"""A warm site in a real deployment: a SuperLink and one SuperNode on 127.0.0.1, the worker started on first use.

The worker is killed during a round: the ClientApp trains that round in its own process, a new worker starts for
the next messages, and the run completes. Once the SuperNode is stopped no worker is left.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deployment_support import Deployment, _stat, model_folder, run_config, running_deployment, wait_for

from flwr_nnunet.demo.data import make_demo_dataset
from flwr_nnunet.site.warm_channel import log_path

ROUNDS = 4


@pytest.fixture
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    with running_deployment(tmp_path, request) as deployment:
        deployment.start_superlink()
        deployment.write_connection()
        yield deployment


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _workers(log: str) -> dict[int, int]:
    """Worker pid -> the SuperNode pid it watches, from its log's 'serving' lines."""
    return {int(pid): int(parent) for pid, parent in re.findall(r"\(pid (\d+), SuperNode pid (\d+)\)", log)}


@pytest.mark.slow
def test_a_worker_killed_mid_round_leaves_a_completed_run_and_no_process_behind(tmp_path, deployment):
    demo = make_demo_dataset(tmp_path / "data", num_sites=2)  # one of them deployed
    site = demo.sites[0]
    node = deployment.start_supernode(site, node_config="warm-site=true")
    results = deployment.site_results(site)
    one = {"min-train-nodes": 1, "min-evaluate-nodes": 1, "min-available-nodes": 1, "iterations-per-epoch": 6}
    run_id = deployment.submit(run_config(demo, num_server_rounds=ROUNDS, fraction_evaluate=0.0, **one))

    # The worker starts with the first message and answers a round r < ROUNDS; it is killed in round r + 1.
    answered = wait_for(
        lambda: re.search(rf"{site.name}: round ([1-{ROUNDS - 1}]) trained", _read(log_path(results))),
        600,
        "a round answered by the warm worker",
        0.1,
    )
    epoch = int(answered.group(1))
    first = next(iter(_workers(_read(log_path(results)))))
    training_logs = list((results / demo.dataset_name).rglob("training_log_*.txt"))
    wait_for(lambda: any(f"Epoch {epoch}" in _read(p) for p in training_logs), 600, f"epoch {epoch}", 0.05)
    assert _stat(first) is not None
    os.kill(first, signal.SIGKILL)

    folder = model_folder(demo)
    assert deployment.wait_until_finished(run_id, folder.checkpoint_path("final")) == "finished:completed"
    text = node.text()
    assert "ended before it answered" in text and "this message is answered in-process" in text, node.tail()
    workers = _workers(_read(log_path(results)))
    assert set(workers.values()) == {node.process.pid}  # each worker watches its SuperNode

    deployment.stop()
    deadline = time.monotonic() + 15
    while any(_stat(pid) is not None for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if _stat(pid) is not None], "a warm worker outlived its SuperNode"
