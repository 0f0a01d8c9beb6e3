"""The site's ClientApp executor (``flwr-nnunet clientapp-exec``): messages' ClientApps forked from one process.

In a real deployment (a SuperLink and one SuperNode on 127.0.0.1, with the warm site) the executor claims the
messages and forks their ClientApps; stopped and killed after round 1, Flower's own SuperExec runs the tasks left
and the run completes, each task run once. Alone, the executor exits when its SuperNode is gone.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deployment_support import _stat, descendants, free_port, model_folder, run_config, running_deployment, wait_for

from flwr_nnunet.apps.clientapp_exec import serve
from flwr_nnunet.demo.data import make_demo_dataset

ROUNDS = 2
FLOWER_STARTED = "Start `flwr-clientapp` process"
"""What a ``flwr-clientapp`` process started by Flower's SuperExec logs first (a forked ClientApp does not)."""
FLOWER_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1"}
"""Flower's own 1 s between two claims, against the executor's 0.02 s here: the executor claims round 1's tasks."""


def _forked(log: str) -> list[int]:
    return [int(task) for task in re.findall(r"clientapp-exec: task (\d+) forked as pid", log)]


def _states(pid: int) -> dict[int, str]:
    """The state letter of each process below ``pid`` (``Z``: ended, not collected)."""
    found = {}
    for child in descendants(pid):
        try:
            found[child] = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
    return found


def _zombies(pid: int) -> list[int]:
    """Children of ``pid`` that ended and were not collected."""
    return [child for child, state in _states(pid).items() if state == "Z"]


def _running(pid: int) -> list[int]:
    """Processes below ``pid`` that have not ended."""
    return [child for child, state in _states(pid).items() if state != "Z"]


@pytest.mark.slow
def test_forked_clientapps_train_and_flower_takes_over_when_the_executor_is_gone(tmp_path, request):
    demo = make_demo_dataset(tmp_path / "data", num_sites=2)  # one of them deployed
    site = demo.sites[0]
    with running_deployment(tmp_path, request) as deployment:
        deployment.start_superlink()
        deployment.write_connection()
        node = deployment.start_supernode(site, node_config="warm-site=true", env=FLOWER_POLL)
        executor = deployment.start_clientapp_exec(site.name, poll=0.02)
        one = {"min-train-nodes": 1, "min-evaluate-nodes": 1, "min-available-nodes": 1, "iterations-per-epoch": 4}
        run_id = deployment.submit(run_config(demo, num_server_rounds=ROUNDS, **one))

        # Round 1's messages run forked: trained, then evaluated by the warm worker through a forked ClientApp.
        wait_for(lambda: len(_forked(executor.text())) >= 2, 600, "two forked ClientApps", 0.1)
        wait_for(lambda: not _zombies(executor.process.pid), 30, "the executor collecting its ended ClientApps", 0.05)
        # Stopped, it claims nothing more; Flower's SuperExec, which polls beside it, gets every task left.
        executor.process.send_signal(signal.SIGSTOP)
        flower_at_stop = node.text().count(FLOWER_STARTED)
        wait_for(lambda: not _running(executor.process.pid), 600, "the forked ClientApps' end", 0.05)
        executor.process.send_signal(signal.SIGKILL)
        executor.process.wait(timeout=10)

        folder = model_folder(demo)
        assert deployment.wait_until_finished(run_id, folder.checkpoint_path("final")) == "finished:completed"
        assert all(folder.checkpoint_path(kind).is_file() for kind in ("latest", "final"))
        forked, flower = _forked(executor.text()), node.text().count(FLOWER_STARTED)
        assert len(forked) == len(set(forked)) >= 2  # each claimed task forked once
        assert len(forked) + flower == 2 * ROUNDS, f"{len(forked)} forked, {flower} by Flower: each task runs once"
        assert flower > flower_at_stop, f"Flower's SuperExec ran nothing after the executor stopped ({forked=})"


def test_the_executor_exits_when_its_supernode_is_gone(tmp_path):
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    log = tmp_path / "exec.log"
    unanswered = f"127.0.0.1:{free_port()}"  # nothing listens there: it keeps trying
    command = ["clientapp-exec", "--parent", str(supernode.pid), "--runtime-api-address", unanswered]
    with log.open("wb") as out:
        executor = subprocess.Popen(
            [sys.executable, "-m", "flwr_nnunet.cli", *command], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: "clientapp-exec: forking" in log.read_text(errors="replace"), 60, "the executor's start")
        time.sleep(0.5)
        assert executor.poll() is None, log.read_text()
        supernode.kill()  # not collected yet: a zombie counts as gone
        assert executor.wait(timeout=20) == 0, log.read_text()
        supernode.wait()
        assert f"SuperNode {supernode.pid} is gone" in log.read_text()
        assert _stat(executor.pid) is None
    finally:
        for process in (supernode, executor):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_a_poll_interval_must_be_positive():
    with pytest.raises(ValueError, match="poll_interval must be positive"):
        serve("127.0.0.1:1", os.getpid(), poll_interval=0.0)


def test_supernode_sh_starts_the_executor_on_the_supernodes_runtime_api(tmp_path):
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "flower-supernode").write_text('#!/usr/bin/env bash\necho $$ > "$CALLS.node"\n')
    python = bin_folder / "python"  # records each command supernode.sh starts in the background
    python.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n')
    for fake in bin_folder.iterdir():
        fake.chmod(0o755)
    (tmp_path / "ca.crt").write_text("")
    (tmp_path / "key").write_text("")
    env = {
        **os.environ,
        "PATH": f"{bin_folder}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": str(python),
        "SUPERLINK": "127.0.0.1:1",
        "CA_CERT": str(tmp_path / "ca.crt"),
        "NODE_KEY": str(tmp_path / "key"),
        "PREPROCESSED": "/pp",
        "RESULTS": str(tmp_path / "results"),
        "SITE_NAME": "hospital-b",
    }
    script = Path(__file__).resolve().parents[1] / "configs" / "deployment" / "supernode.sh"

    def executor_command(*flags: str) -> tuple[str, int]:
        calls = tmp_path / f"calls-{len(flags)}-{'-'.join(flags)}"
        subprocess.run(["bash", str(script), *flags], env={**env, "CALLS": str(calls)}, check=True)
        wait_for(lambda: calls.is_file() and len(calls.read_text().splitlines()) == 2, 30, "both background starts")
        started = [line for line in calls.read_text().splitlines() if "clientapp-exec" in line]
        assert len(started) == 1, calls.read_text()
        return started[0], int(Path(f"{calls}.node").read_text())

    command, node = executor_command()
    assert f"--runtime-api-address 127.0.0.1:9094 --parent {node}" in command  # the SuperNode's own pid
    assert "--runtime-api-address 127.0.0.1:9200" in executor_command("--host", "0.0.0.0", "--port", "9200")[0]
    assert "--runtime-api-address 10.1.2.3:9300" in executor_command("--host", "10.1.2.3", "--port", "9300")[0]
    no_warm = tmp_path / "calls-no-warm"
    subprocess.run(["bash", str(script)], env={**env, "CALLS": str(no_warm), "WARM_SITE": "false"}, check=True)
    time.sleep(0.5)
    assert not no_warm.exists()  # WARM_SITE=false: neither the worker nor the executor
