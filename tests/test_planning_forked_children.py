"""A child forked by a Flower app process must not run Flower's exit handlers (issue 22, item 5).

Flower's ServerApp handles SIGTERM by pushing its task's final status with the task's token. nnU-Net's
experiment planner forks a ``multiprocessing.Pool`` in the ServerApp and terminates it with SIGTERM: a worker
that ran the inherited handler ended the run. Each case runs in a fresh interpreter with Flower's own
``register_signal_handlers``, whose exit handler writes the pid of the process that ran it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import multiprocessing, os, sys, time
from flwr.supercore.telemetry import EventType
from flwr.supercore.exit import register_signal_handlers
from flwr_nnunet.apps.forked_children import default_signals_in_forked_children

record = sys.argv[1]

def report_task_end():  # stands for the ServerApp's on_exit: PushTaskOutput with the task's token
    with open(record, "a") as out:
        out.write(f"{os.getpid()}\\n")

register_signal_handlers(EventType.FLWR_SERVERAPP_RUN_LEAVE, exit_handlers=[report_task_end])
if sys.argv[2] == "fixed":
    default_signals_in_forked_children()
    default_signals_in_forked_children()  # registered once
elif sys.argv[2] == "client-app":  # the ClientApp's module registers it when its process imports it
    sys.path.insert(0, sys.argv[3])
    import client_app
context = multiprocessing.get_context("fork")
child = context.Process(target=time.sleep, args=(60,))
child.start()
time.sleep(1.0)
child.terminate()  # what Pool.__exit__ does to its workers
child.join(30)
with context.Pool(4) as pool:  # nnU-Net's create_lists_from_splitted_dataset_folder
    pool.starmap(max, [])
print(child.exitcode)
"""


@pytest.mark.parametrize(
    ("mode", "reports", "exitcode"), [("as-flower-leaves-it", 1, "0"), ("fixed", 0, "-15"), ("client-app", 0, "-15")]
)
def test_a_forked_child_sigtermed_never_reports_the_task_end(tmp_path: Path, mode, reports, exitcode) -> None:
    """As Flower leaves it, the forked child runs the exit handler (the failure); with
    default_signals_in_forked_children it dies of SIGTERM and nothing but the app process may report."""
    record = tmp_path / "reported-by"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(record), mode, str(Path(__file__).resolve().parents[1])],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pids = record.read_text().split() if record.exists() else []
    assert done.stdout.split()[-1] == exitcode, done.stdout
    assert len(pids) >= reports and (reports or not pids), pids
