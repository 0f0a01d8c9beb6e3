"""End to end, as a hospital deployment runs: a SuperLink, one SuperNode per site, `flwr run`, real processes.

Everything binds to 127.0.0.1 on free ports; FLWR_HOME and all data live in the test's tmp folder. Each
message runs in a fresh ``flwr-clientapp`` process, so the sites must rebuild their trainer from disk every round.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from flwr_nnunet import AliasMap
from flwr_nnunet.apps.history import HISTORY_FILE
from flwr_nnunet.demo.data import DemoSite, make_demo_dataset
from flwr_nnunet.nnunet.checkpoint_io import load_checkpoint
from flwr_nnunet.nnunet.model_folder import NnUNetModelFolder
from flwr_nnunet.nnunet.networks import build_trainer_network
from flwr_nnunet.site.spec import STATE_FILE, STATE_TOKEN_FILE, SiteSpec

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
CONNECTION = "e2e-local"
ROUNDS = 2
RUN_TIMEOUT_S = 240.0
LOG_TAIL_CHARS = 4000
POLLING = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}
"""SuperExec looks for new tasks every 0.2 s instead of 1 s: each message starts a process sooner."""


def free_port() -> int:
    """A port nothing listens on now, chosen by the kernel on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port (fail if the process exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout:.0f} s")


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc/<pid>/stat; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """Every process below ``pid`` (SuperExec, flwr-serverapp, flwr-clientapp): pid -> start time."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found: dict[int, int] = {}
    stack = [pid]
    while stack:
        for child, started in children.get(stack.pop(), []):
            found[child] = started
            stack.append(child)
    return found


@dataclass
class Service:
    """One long-running Flower process and the file its output goes to."""

    name: str
    process: subprocess.Popen
    log: Path

    def tail(self) -> str:
        """The end of the log, headed by the service's name and exit status."""
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        header = f"----- {self.name} (exit {self.process.poll()}), last lines of {self.log} -----"
        return f"{header}\n{text[-LOG_TAIL_CHARS:]}"


class Deployment:
    """Starts the SuperLink and the SuperNodes; :meth:`stop` ends them and everything they started."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.services: list[Service] = []
        self.flwr_home = tmp_path / "flwr-home"
        self.flwr_home.mkdir()
        self.link_port = free_port()

    def start(self, name: str, command: list[str], env: dict[str, str]) -> Service:
        """Start ``command`` with its output in ``<tmp_path>/<name>.log``."""
        log = self.tmp_path / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.tmp_path)
        service = Service(name, process, log)
        self.services.append(service)
        return service

    def environment(self, flwr_home: Path, **extra: str) -> dict[str, str]:
        """The parent's environment with this venv's Flower commands first on PATH (SuperExec is found there),
        one thread per process (two sites share the CPUs), and fast SuperExec polling."""
        path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
        return {**os.environ, "PATH": path, "FLWR_HOME": str(flwr_home), "OMP_NUM_THREADS": "1", **POLLING, **extra}

    def start_superlink(self) -> None:
        """The SuperLink: every API on 127.0.0.1 (the deprecated gRPC addresses too, should they be enabled)."""
        command = [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--host", HOST,
            "--port", str(self.link_port),
            "--fleet-api-address", f"{HOST}:{free_port()}",
            "--control-api-address", f"{HOST}:{free_port()}",
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        service = self.start("superlink", command, self.environment(self.flwr_home))
        wait_for_port(self.link_port, service.process)

    def site_results(self, site: DemoSite) -> Path:
        """The folder a hospital's SuperNode names as node-config ``nnunet-results``."""
        return self.tmp_path / f"{site.name}-results"

    def start_supernode(self, site: DemoSite) -> None:
        """One hospital: its own Runtime API port, its folders in ``--node-config``, its nnU-Net environment."""
        node_config = " ".join(
            [
                f"nnunet-preprocessed='{site.nnunet_preprocessed}'",
                f"nnunet-results='{self.site_results(site)}'",
                f"site-name='{site.name}'",
            ]
        )
        port = free_port()
        command = [
            str(BIN / "flower-supernode"),
            "--insecure",
            "--superlink", f"{HOST}:{self.link_port}",
            "--host", HOST,
            "--port", str(port),
            "--node-config", node_config,
        ]  # fmt: skip
        home = self.tmp_path / f"flwr-home-{site.name}"
        home.mkdir()
        service = self.start(site.name, command, self.environment(home, **site.environ()))
        wait_for_port(port, service.process)

    def write_connection(self) -> None:
        """The researcher's ``$FLWR_HOME/config.toml``: one insecure connection to this SuperLink, the default."""
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{HOST}:{self.link_port}"\ninsecure = true\n'
        )

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI as the researcher does, against this deployment's FLWR_HOME."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.environment(self.flwr_home),
            cwd=self.tmp_path,
        )

    def logs(self) -> str:
        """The end of every service's log, for the test report."""
        return "\n".join(service.tail() for service in self.services)

    def stop(self) -> None:
        """SIGTERM every service, wait, SIGKILL what is left, then the processes they started (same pid and start)."""
        started = {pid: ticks for service in self.services for pid, ticks in descendants(service.process.pid).items()}
        for service in self.services:
            if service.process.poll() is None:
                service.process.terminate()
        for service in self.services:
            try:
                service.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait(timeout=10)

        def ours() -> list[int]:
            return [pid for pid, ticks in started.items() if (stat := _stat(pid)) is not None and stat[1] == ticks]

        deadline = time.monotonic() + 10
        while ours() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in ours():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """A running SuperLink; always stopped with everything it started, its logs printed if the test failed."""
    failures = request.session.testsfailed
    deployment = Deployment(tmp_path)
    try:
        deployment.start_superlink()
    except BaseException:
        deployment.stop()
        print(deployment.logs())
        raise
    try:
        yield deployment
    finally:
        deployment.stop()
        if request.session.testsfailed > failures:
            print(deployment.logs())


def run_status(deployment: Deployment, run_id: str) -> str:
    """The run's status as ``flwr ls <connection> --format=json`` reports it (e.g. ``finished:completed``)."""
    result = deployment.flwr("ls", CONNECTION, "--format=json", "--run-id", run_id)
    assert result.returncode == 0, f"flwr ls failed:\n{result.stdout}\n{result.stderr}"
    runs = json.loads(result.stdout)["runs"]
    return str(runs[0]["status"]) if runs else "unknown"


def wait_until_finished(deployment: Deployment, run_id: str) -> str:
    """Poll ``flwr ls`` until the run has finished (or RUN_TIMEOUT_S passed); fail at once if a service died."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    status = run_status(deployment, run_id)
    while not status.startswith("finished") and time.monotonic() < deadline:
        for service in deployment.services:
            assert service.process.poll() is None, f"{service.name} exited with {service.process.returncode}"
        time.sleep(2)
        status = run_status(deployment, run_id)
    return status


@pytest.mark.slow
def test_superlink_two_supernodes_flwr_run(tmp_path: Path, deployment: Deployment) -> None:
    """2 hospitals, 2 rounds through `flwr run`: global model, per-site round state rebuilt from disk, history."""
    demo = make_demo_dataset(tmp_path / "data", num_sites=2)
    for site in demo.sites:
        deployment.start_supernode(site)
    deployment.write_connection()
    run_config = tmp_path / "run.toml"
    run_config.write_text(
        "".join(f"{key} = {json.dumps(value)}\n" for key, value in demo.run_config().items())
        + f"num-server-rounds = {ROUNDS}\n"
        "iterations-per-epoch = 5\n"
        "val-iterations-per-epoch = 2\n"
        "min-train-nodes = 2\nmin-evaluate-nodes = 2\nmin-available-nodes = 2\n"
        'device = "cpu"\n'
        "round-timeout = 120.0\n"
    )

    submitted = deployment.flwr("run", str(REPO), CONNECTION, "--run-config", str(run_config), "--format=json")
    assert submitted.returncode == 0, f"flwr run failed:\n{submitted.stdout}\n{submitted.stderr}"
    run_id = json.loads(submitted.stdout)["run-id"]
    assert wait_until_finished(deployment, run_id) == "finished:completed"

    plans = json.loads(demo.plans_file.read_text())
    dataset_json = json.loads((demo.server.preprocessed_dataset_folder / "dataset.json").read_text())
    folder = NnUNetModelFolder.in_results(demo.server.nnunet_results, plans, dataset_json, None, demo.configuration)
    final = folder.checkpoint_path("final")
    assert final.is_file(), f"no {final}"
    checkpoint = torch.load(final, weights_only=True, map_location="cpu")
    assert checkpoint["flwr_nnunet"]["server_round"] == ROUNDS
    weights = checkpoint["network_weights"]
    network = build_trainer_network(plans, dataset_json, demo.configuration)
    assert set(weights) == set(network.state_dict())
    amap = AliasMap.from_module(network)
    shared = [group for group in amap.groups.values() if len(group) > 1]
    assert shared, "the nnU-Net network should have aliased keys"
    for group in shared:
        assert len({weights[key].untyped_storage().data_ptr() for key in group}) == 1, f"aliases split: {group}"

    for site in demo.sites:
        spec = SiteSpec(
            name=site.name,
            dataset=demo.dataset_name,
            nnunet_preprocessed=site.nnunet_preprocessed,
            nnunet_results=deployment.site_results(site),
            configuration=demo.configuration,
        )
        assert spec.state_file.name == STATE_FILE and spec.state_file.is_file(), f"no {spec.state_file}"
        state = load_checkpoint(spec.state_file)
        assert state["current_epoch"] == ROUNDS, f"{site.name}: epoch {state['current_epoch']} after {ROUNDS} rounds"
        token = json.loads((spec.output_folder / STATE_TOKEN_FILE).read_text())
        assert token["epoch"] == ROUNDS
        log = (tmp_path / f"{site.name}.log").read_text()
        assert log.count("Start `flwr-clientapp` process") == 2 * ROUNDS, f"{site.name}: not one process per message"
        assert f"{site.name}: trainer rebuilt from {spec.state_file}" in log

    history = json.loads((folder.path / HISTORY_FILE).read_text())
    assert sorted(history["rounds"]) == [str(r) for r in range(1, ROUNDS + 1)]
