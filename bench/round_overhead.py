"""Round overhead of a deployment: E federated rounds of one local epoch against E plain nnU-Net epochs.

A SuperLink and one SuperNode run on 127.0.0.1 (``tests/deployment_support.py``, insecure; the SuperExec polls
every 0.2 s as in the deployment tests) and train E rounds of one local epoch on the 2D demo's site-0, once
cold (node-config ``warm-site=false``: every message a fresh ``flwr-clientapp`` process that rebuilds the trainer
from the round-state file) and once warm (the site's warm worker, started beside the SuperNode as
``configs/deployment/supernode.sh`` does). The same site's preprocessed data then trains E epochs of plain nnU-Net
in this process (the trainer's own epoch hooks, the same iterations). Overhead per round is
(federated round - plain epoch), over the rounds after the first (round 1 also pays the planning and the
first trainer build).

A third run adds the site's ClientApp executor (``flwr-nnunet clientapp-exec``, as ``supernode.sh`` starts it,
beside Flower's SuperExec polling at its default 1 s): each message's ClientApp is a fork of a process that has
imported Flower.

A watcher samples every 10 ms: the start of each ``flwr-clientapp`` process under the SuperNode, or ClientApp
forked by the executor (``/proc``), the site's round-state token (written when a round's training is saved) and the server's
``checkpoint_latest.pth`` (written once a round is aggregated). A round splits into
- site (message): from the ClientApp process's start to the site's round state saved; less the plain epoch, it
  is the site's overhead: process start and imports, trainer build, data loader start and the first epoch's
  warm-up, measured alone in a fresh process as a cold message runs them (:data:`FRESH_PROCESS`), and the rest
  (the message pulled from the SuperNode, the round state written, the instruction checked, decode / encode).
  A warm message's process imports only Flower and hands the message to the worker;
- reply to aggregated: the reply's way to the server and its aggregation and checkpoint (server time, with the
  transfer and Flower's polling);
- aggregated to next message: the next instruction's way to the SuperNode and the process it starts (Flower's
  polling, with the transfer).
Server time is the aggregation the ServerApp logs (``aggregate_train: ... in X s``); Flower's polling is what
the two legs between the site's rounds hold besides it. Transfer itself is measured alone: the model encoded and
decoded both ways (``core/codec`` and Flower's protobuf).

Run: ``python bench/round_overhead.py [--rounds 4] [--iterations 10]`` (about 8 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TICK_S = 0.01
FORKED = b"clientapp-exec"
"""In the command line of a ClientApp forked by the site's executor (it is the executor's)."""
PATHS = {"cold": (False, False), "warm": (True, False), "forked": (True, True)}
"""Each measured path: (the site's warm worker, its ClientApp executor)."""
LABELS = {
    "cold": "cold (a process per message)",
    "warm": "warm (the site's warm worker)",
    "forked": "warm, ClientApps forked (`clientapp-exec`)",
}
FLOWER_POLLING = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"}
"""Flower's SuperExec polls at its default beside the site's executor, as ``supernode.sh`` runs them."""


def _boot_time() -> float:
    """The boot as a wall-clock time, to the clock's precision (``/proc/stat``'s ``btime`` is whole seconds)."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def _process_start(pid: int) -> float | None:
    """A process's start as a wall-clock time (from /proc: clock ticks after boot)."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
    return _boot_time() + ticks / os.sysconf("SC_CLK_TCK")


class Watcher(threading.Thread):
    """Samples the ClientApp processes' starts, the site's saved rounds and the server's checkpoints."""

    def __init__(self, parents: dict[int, bytes], token_file: Path, checkpoint: Path):
        super().__init__(daemon=True)
        self.parents, self.token_file, self.checkpoint = parents, token_file, checkpoint
        self.starts: dict[int, float] = {}
        self.forked = 0
        self.saved: dict[int, float] = {}
        self.aggregated: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        from deployment_support import descendants

        last_checkpoint = None
        while not self.done.is_set():
            for parent, marker in self.parents.items():
                for pid in descendants(parent):
                    if pid not in self.starts:
                        try:
                            command = Path(f"/proc/{pid}/cmdline").read_bytes()
                        except OSError:  # it ended meanwhile
                            continue
                        if marker in command and (started := _process_start(pid)) is not None:
                            self.starts[pid] = started
                            self.forked += marker == FORKED
            if self.token_file.is_file():
                try:
                    saved = json.loads(self.token_file.read_text()).get("round")
                except ValueError:
                    saved = None
                if isinstance(saved, int) and saved not in self.saved:
                    self.saved[saved] = self.token_file.stat().st_mtime
            if self.checkpoint.is_file() and (mtime := self.checkpoint.stat().st_mtime) != last_checkpoint:
                last_checkpoint = mtime
                self.aggregated.append(mtime)
            time.sleep(TICK_S)


def federated(demo, rounds: int, iterations: int, *, warm: bool, forked: bool, root: Path) -> dict[str, float]:
    """E rounds in a loopback deployment; the mean phases of rounds 2..E (seconds), and how many ClientApps the
    site's executor forked (``forked``: it runs beside the SuperNode, as ``supernode.sh`` starts it)."""
    from deployment_support import Deployment, model_folder, run_config

    from flwr_nnunet.site.spec import SiteSpec
    from flwr_nnunet.site.warm_channel import socket_path, start_warm_site

    deployment = Deployment(root)
    worker = None
    try:
        deployment.start_superlink()
        deployment.write_connection()
        site = demo.sites[0]
        node = deployment.start_supernode(
            site, node_config=f"warm-site={'true' if warm else 'false'}", env=FLOWER_POLLING if forked else None
        )
        parents = {node.process.pid: b"flwr-clientapp"}
        if forked:
            parents[deployment.start_clientapp_exec(site.name).process.pid] = FORKED
        results = deployment.site_results(site)
        if warm:  # as supernode.sh starts it: beside the SuperNode, before the first message
            worker = start_warm_site(results, node.process.pid)
            while not socket_path(results).exists():
                time.sleep(0.1)
        folder = model_folder(demo)
        spec = SiteSpec(
            name=site.name,
            dataset=demo.dataset_name,
            nnunet_preprocessed=site.nnunet_preprocessed,
            nnunet_results=results,
            configuration=demo.configuration,
        )
        watcher = Watcher(parents, spec.state_token_file, folder.checkpoint_path("latest"))
        budget = {"min-train-nodes": 1, "min-evaluate-nodes": 1, "min-available-nodes": 1}
        config = run_config(
            demo,
            num_server_rounds=rounds,
            fraction_evaluate=0.0,
            iterations_per_epoch=iterations,
            val_iterations_per_epoch=2,
            seed=1,
            **budget,
        )
        watcher.start()
        run_id = deployment.submit(config)
        status = deployment.wait_until_finished(run_id, folder.checkpoint_path("final"))
        watcher.done.set()
        watcher.join()
        assert status == "finished:completed", f"{status}\n{deployment.logs()}"
        server_log = deployment.server_log(run_id)
    finally:
        deployment.stop()
        if worker is not None:
            worker.wait(timeout=30)
    starts = sorted(watcher.starts.values())
    aggregation = {
        int(r): float(t) for r, t in re.findall(r"aggregate_train: round (\d+): .*? in ([\d.]+) s", server_log)
    }
    phases: dict[str, list[float]] = {"round": [], "site": [], "reply": [], "next": [], "server": []}
    for server_round in range(2, rounds + 1):
        saved, before = watcher.saved[server_round], watcher.saved[server_round - 1]
        start = max(s for s in starts if s <= saved)
        aggregated_before = min(a for a in watcher.aggregated if a >= before)
        phases["round"].append(saved - before)
        phases["site"].append(saved - start)
        phases["reply"].append(aggregated_before - before)
        phases["next"].append(start - aggregated_before)
        phases["server"].append(aggregation.get(server_round - 1, math.nan))  # nan: the log did not say
    means = {key: statistics.mean(values) for key, values in phases.items()}
    return {**means, "messages": len(starts), "forked": watcher.forked}


def plain(demo, rounds: int, iterations: int, root: Path) -> dict[str, float]:
    """E epochs of nnU-Net's own trainer in this process; the trainer build (from a round state) and the data
    loader start, measured alone."""
    import torch

    from flwr_nnunet.site.runtime import cpu_worker_defaults, run_epoch
    from flwr_nnunet.site.site import Site
    from flwr_nnunet.site.spec import SiteSpec, TrainOptions

    site_data = demo.sites[0]
    spec = SiteSpec(
        name=site_data.name,
        dataset=demo.dataset_name,
        nnunet_preprocessed=site_data.nnunet_preprocessed,
        nnunet_results=root / "plain-results",
        configuration=demo.configuration,
        device="cpu",
    )
    options = TrainOptions(num_epochs=rounds, iterations_per_epoch=iterations, val_iterations_per_epoch=2)
    site = Site(spec)
    site.start(options)
    trainer = site.trainer
    trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = iterations, 2
    with cpu_worker_defaults(trainer.device):
        trainer.on_train_start()
    torch.manual_seed(1)
    epochs = []
    for _ in range(rounds):
        started = time.perf_counter()
        run_epoch(trainer)
        epochs.append(time.perf_counter() - started)
    started = time.perf_counter()
    trainer.logger.plot_progress_png(trainer.output_folder)  # what each epoch's end draws, alone
    plot = time.perf_counter() - started
    site.save_state(1)
    return {"epoch": statistics.mean(epochs[1:]), "plot": plot, "spec": spec}


FRESH_PROCESS = """
import json, sys, time
started = time.perf_counter()
from flwr.supernode.cli import flwr_clientapp  # noqa: F401 - what a flwr-clientapp process imports (Flower's own)
flower = time.perf_counter()
import client_app  # noqa: F401 - the app on top: all that a message its warm worker answers imports
imported = time.perf_counter()
import flwr_nnunet.apps.client  # noqa: F401 - what a message answered in-process adds: torch, nnU-Net
cold_imported = time.perf_counter()
from pathlib import Path
from flwr_nnunet.site.runtime import cpu_worker_defaults, run_epoch
from flwr_nnunet.site.site import Site
from flwr_nnunet.site.spec import SiteSpec, TrainOptions
entries, rounds, iterations = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
folders = {key: Path(entries[key]) for key in ("nnunet_preprocessed", "nnunet_results")}
spec = SiteSpec(**{**entries, **folders})
site = Site(spec)
site.start(TrainOptions(num_epochs=rounds + 2, server_round=2))  # two epochs past the saved state
trainer = site.trainer
trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = iterations, 2
built = time.perf_counter()
with cpu_worker_defaults(trainer.device):
    trainer.on_train_start()
loaders = time.perf_counter()
run_epoch(trainer)
first = time.perf_counter()
run_epoch(trainer)
second = time.perf_counter()
print(json.dumps({"flower": flower - started, "imports": imported - flower, "cold imports": cold_imported - imported,
                  "build": built - cold_imported, "loaders": loaders - built,
                  "first": first - loaders, "second": second - first}))
"""
"""A fresh process as a cold message is: imports (Flower's ``flwr-clientapp``, the app, then what answering
in-process adds), the trainer rebuilt from the round state, its data loaders started, then two epochs (the first
pays the warm-up of a fresh process)."""


def fresh_process(spec, rounds: int, iterations: int) -> dict[str, float]:
    """:data:`FRESH_PROCESS`'s seconds for ``spec``'s round state (in the environment of the SuperNode's processes)."""
    entries = {key: str(value) if isinstance(value, Path) else value for key, value in vars(spec).items()}
    command = [sys.executable, "-c", FRESH_PROCESS, json.dumps(entries), str(rounds), str(iterations)]
    done = subprocess.run(command, cwd=REPO, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the fresh process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def transfer(demo) -> float:
    """Seconds to encode and decode the demo's model both ways (codec and Flower's protobuf), as a round does."""
    sys.path.insert(0, str(REPO / "tests"))
    from flwr.app import RecordDict
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
    from test_site import initial_weights

    from flwr_nnunet.core.codec import from_array_record, to_array_record

    weights = initial_weights(demo)
    started = time.perf_counter()
    for _ in range(2):  # the instruction and the reply
        data = recorddict_to_proto(RecordDict({"arrays": to_array_record(weights)})).SerializeToString()
        from_array_record(recorddict_from_proto(ProtoRecordDict.FromString(data))["arrays"])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="E: rounds (and plain epochs)")
    parser.add_argument("--iterations", type=int, default=10, help="training batches per epoch")
    arguments = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)  # as the SuperNode's processes run (deployment_support: OMP_NUM_THREADS=1)
    from flwr_nnunet.demo.data import make_demo_dataset

    with tempfile.TemporaryDirectory(prefix="round-overhead-") as folder:
        root = Path(folder)
        demo = make_demo_dataset(root / "data", num_sites=2)
        base = plain(demo, arguments.rounds, arguments.iterations, root)
        moved = transfer(demo)
        fresh = fresh_process(base["spec"], arguments.rounds, arguments.iterations)
        runs = {}
        for path, (warm, forked) in PATHS.items():
            (root / path).mkdir()
            runs[path] = federated(
                demo, arguments.rounds, arguments.iterations, warm=warm, forked=forked, root=root / path
            )
    rounds = arguments.rounds
    print(
        f"\nRound overhead, 2D demo site-0, {arguments.iterations} training + 2 validation batches per epoch, "
        f"E = {rounds} rounds (means of rounds 2..{rounds}); plain nnU-Net epoch {base['epoch']:.2f} s\n"
    )
    print(
        "| path | round | overhead per round | site: message - epoch | reply to aggregated | aggregated to next "
        "message | server time (aggregation) | Flower's polling | overhead without Flower's polling | the same, "
        "against the plain epoch less its plot |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path, label in LABELS.items():
        run = runs[path]
        overhead, polling = run["round"] - base["epoch"], run["reply"] + run["next"] - run["server"]
        print(
            f"| {label} | {run['round']:.2f} s | {overhead:.2f} s | {run['site'] - base['epoch']:.2f} s | "
            f"{run['reply']:.2f} s | {run['next']:.2f} s | {run['server']:.2f} s | {polling:.2f} s | "
            f"{overhead - polling:.2f} s | {overhead - polling + base['plot']:.2f} s |"
        )
    print(
        f"\nOf the plain epoch, {base['plot']:.2f} s is nnU-Net's progress plot (`progress.png`, drawn at every "
        "epoch's end); a warm worker draws it after its reply, off the round's path."
    )
    forked = runs["forked"]
    print(f"\nForked by the site's executor: {forked['forked']} of {forked['messages']} messages (the rest: Flower's)")
    print("\nMeasured alone at the same time: fresh processes as a message's ClientApp runs them\n")
    print("| part | seconds | paid per round |")
    print("|---|---|---|")
    print(
        f"| Flower's own imports in a `flwr-clientapp` process (`flwr.supernode.cli`) | {fresh['flower']:.2f} | cold and warm |"
    )
    print(
        f"| the ClientApp on top (`import client_app`): a warm message's imports | {fresh['imports']:.2f} | cold and warm |"
    )
    print(
        f"| what in-process training adds: torch, nnU-Net (`flwr_nnunet.apps.client`) | {fresh['cold imports']:.2f} | cold |"
    )
    print(f"| trainer build from the round state | {fresh['build']:.2f} | cold |")
    print(f"| data loader start (`on_train_start`) | {fresh['loaders']:.2f} | cold |")
    print(f"| first epoch in a fresh process - its second epoch | {fresh['first'] - fresh['second']:.2f} | cold |")
    print(f"| transfer: the model encoded and decoded both ways | {moved:.3f} | cold and warm |")


if __name__ == "__main__":
    main()
