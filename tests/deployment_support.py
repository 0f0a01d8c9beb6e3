"""Real Flower processes on 127.0.0.1 for the deployment tests: a SuperLink, SuperNodes, the ``flwr`` CLI.

Everything binds to 127.0.0.1 on free ports; FLWR_HOME, certificates, keys and data live in the test's tmp
folder. Processes are started by the tests and stopped by their process ids (with everything they started,
matched by pid and start time), never by name. A secure deployment runs the guide's own scripts
(``configs/deployment/*.sh``, ``scripts/make_test_certificates.sh``) with the guide's environment variables.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from flwr_nnunet.demo.data import DemoDataset, DemoSite
from flwr_nnunet.nnunet.model_folder import NnUNetModelFolder
from flwr_nnunet.site.spec import SiteSpec

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = REPO / "configs" / "deployment"
CERTIFICATE_SCRIPT = REPO / "scripts" / "make_test_certificates.sh"
RUN_CONFIG_FILE = REPO / "configs" / "deployment.toml"
HOST = "127.0.0.1"
CONNECTION = "e2e-local"
RUN_TIMEOUT_S = 900.0
"""Generous: on a loaded shared 2-core machine one `flwr ls` took up to 10 s and a round of 2 sites 2-3 minutes."""
LOG_TAIL_CHARS = 4000
STATUS_POLL_S = 15.0
"""How often :meth:`Deployment.wait_until_finished` asks the SuperLink while the run's result is not there."""
POLLING = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}
"""SuperExec looks for new tasks every 0.2 s instead of 1 s: each message starts a process sooner."""

TINY_BUDGET = {
    "iterations-per-epoch": 2,
    "val-iterations-per-epoch": 1,
    "min-train-nodes": 2,
    "min-evaluate-nodes": 2,
    "min-available-nodes": 2,
    "device": "cpu",
    "round-timeout": 150.0,
}
"""The deployment tests' nnU-Net budget: a few batches per round, CPU, both sites required."""


def free_port() -> int:
    """A port nothing listens on now, chosen by the kernel on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 180.0) -> None:
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


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    """Poll ``condition()`` until it returns something true (returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not seen after {timeout:.0f} s")


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


def _state_folder(tmp_path: Path) -> Path:
    """Where the SuperLink's SQLite database goes: in memory-backed /dev/shm where there is one (on a loaded
    machine, fsyncs on disk held the database lock past SQLite's 5 s busy timeout: "database is locked"),
    else in ``tmp_path``. Removed by :meth:`Deployment.stop`."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="flwr-nnunet-superlink-", dir=shm))
    return tmp_path / "superlink-state"


def kill_processes(started: Mapping[int, int]) -> None:
    """SIGKILL each process of ``started`` (pid -> start time) that is still the same process."""
    for pid, ticks in started.items():
        if (stat := _stat(pid)) is not None and stat[1] == ticks:
            os.kill(pid, signal.SIGKILL)


@dataclass
class Service:
    """One long-running Flower process and the file its output goes to."""

    name: str
    process: subprocess.Popen
    log: Path
    port: int | None = None
    env: dict[str, str] | None = None
    """The port it listens on (a SuperNode's Runtime API), where the test knows it."""

    def tail(self) -> str:
        """The end of the log, headed by the service's name and exit status."""
        text = self.text()
        header = f"----- {self.name} (exit {self.process.poll()}), last lines of {self.log} -----"
        return f"{header}\n{text[-LOG_TAIL_CHARS:]}"

    def text(self) -> str:
        """The whole log so far."""
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def node_id(self, timeout: float = 60.0) -> int:
        """A SuperNode's id, from its log line ``SuperNode ID: <id>``."""
        found = wait_for(lambda: re.search(r"SuperNode ID: (\d+)", self.text()), timeout, f"{self.name}'s node id")
        return int(found.group(1))

    def kill(self) -> None:
        """SIGKILL this process and everything it started (a machine that dies), then reap it."""
        started = descendants(self.process.pid)
        self.process.kill()
        self.process.wait(timeout=10)
        kill_processes(started)


class Deployment:
    """Starts the SuperLink and the SuperNodes; :meth:`stop` ends them and everything they started.

    Parameters
    ----------
    tmp_path
        The test's folder: logs, FLWR_HOME folders, certificates, the SuperLink's database.
    secure
        Run the guide: TLS (throw-away certificates from ``scripts/make_test_certificates.sh``), SuperNode
        authentication and the SuperLink's state in SQLite, through ``configs/deployment/superlink.sh`` and
        ``supernode.sh``. False: an insecure SuperLink and SuperNodes, state in memory (``bench/transport.py``).
    """

    def __init__(self, tmp_path: Path, *, secure: bool = False):
        self.tmp_path = tmp_path
        self.secure = secure
        self.services: list[Service] = []
        self.flwr_home = tmp_path / "flwr-home"
        self.flwr_home.mkdir()
        self.certs = tmp_path / "certs"
        self.state = _state_folder(tmp_path)
        self.link_port = free_port()
        self.deprecated_ports = (free_port(), free_port())
        self.superlink: Service | None = None
        self.supernodes: dict[str, Service] = {}
        self._starts: dict[str, int] = {}

    # ------------------------------------------------------------- processes
    def start(self, name: str, command: list[str], env: dict[str, str]) -> Service:
        """Start ``command`` with its output in ``<tmp_path>/<name>.log`` (``-2``, ``-3``: restarts)."""
        count = self._starts[name] = self._starts.get(name, 0) + 1
        log = self.tmp_path / (f"{name}.log" if count == 1 else f"{name}-{count}.log")
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.tmp_path)
        service = Service(name, process, log, env=env)
        self.services.append(service)
        return service

    def environment(self, flwr_home: Path, **extra: str) -> dict[str, str]:
        """The parent's environment with this venv's Flower commands first on PATH (SuperExec is found there),
        one thread per process (two sites share the CPUs), and fast SuperExec polling (insecure deployments: on a
        loaded machine the SQLite state of a secure one answered "database is locked" more often with it)."""
        path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
        polling = {} if self.secure else POLLING  # with SQLite state, each poll is a write: keep Flower's 1 s
        return {**os.environ, "PATH": path, "FLWR_HOME": str(flwr_home), "OMP_NUM_THREADS": "1", **polling, **extra}

    def make_certificates(self, *nodes: str) -> None:
        """The guide's throw-away CA, SuperLink certificate (for IP:127.0.0.1) and one key pair per node name."""
        subprocess.run(["bash", str(CERTIFICATE_SCRIPT), str(self.certs), *nodes], check=True, capture_output=True)

    def start_superlink(self) -> Service:
        """The SuperLink: every API on 127.0.0.1 (the deprecated gRPC addresses too, should they be enabled).

        Secure: ``CERTS=<certs> STATE=<state> HOST=127.0.0.1 PORT=<port> configs/deployment/superlink.sh``.
        Started again after :meth:`kill_superlink`, it keeps its port (and, secure, its database).
        """
        deprecated = [
            "--fleet-api-address", f"{HOST}:{self.deprecated_ports[0]}",
            "--control-api-address", f"{HOST}:{self.deprecated_ports[1]}",
        ]  # fmt: skip
        if self.secure:
            command = ["bash", str(CONFIGS / "superlink.sh"), *deprecated]
            extra = {"CERTS": str(self.certs), "STATE": str(self.state), "HOST": HOST, "PORT": str(self.link_port)}
        else:
            command = [
                str(BIN / "flower-superlink"), "--insecure", "--host", HOST, "--port", str(self.link_port),
                *deprecated, "--disable-runtime-dependency-installation",
            ]  # fmt: skip
            extra = {}
        service = self.superlink = self.start("superlink", command, self.environment(self.flwr_home, **extra))
        wait_for_port(self.link_port, service.process)
        return service

    def kill_superlink(self) -> None:
        """The coordinator dies: SIGKILL the SuperLink and what it started (SuperExec, the ServerApp)."""
        assert self.superlink is not None
        self.superlink.kill()

    def site_results(self, site: DemoSite) -> Path:
        """The folder a hospital's SuperNode names as node-config ``nnunet-results``."""
        return self.tmp_path / f"{site.name}-results"

    def start_supernode(
        self,
        site: DemoSite,
        *,
        name: str | None = None,
        key: str | None = None,
        root_certificates: bool = True,
        wait: bool = True,
        node_config: str = "",
        env: Mapping[str, str] | None = None,
    ) -> Service:
        """One hospital: its own Runtime API port, its folders in ``--node-config``, its nnU-Net environment.

        Secure: ``SUPERLINK=127.0.0.1:<port> CA_CERT=<certs>/ca.crt NODE_KEY=<certs>/<key> PREPROCESSED=...
        RESULTS=... SITE_NAME=... configs/deployment/supernode.sh --host 127.0.0.1 --port <port>`` (``key``
        defaults to the site's name). ``root_certificates=False`` starts ``flower-supernode`` with the same
        flags but without ``--root-certificates`` (it trusts only the system's CAs), giving up after 2 tries.
        ``name`` (default: the site's) names the service, its log and results folder; ``wait``: until its Runtime
        API listens (a refused node may exit before). ``node_config``: more ``--node-config`` entries (insecure);
        ``env``: more environment variables (e.g. Flower's SuperExec polling).
        """
        name = name or site.name
        port = free_port()
        own = ["--host", HOST, "--port", str(port)]
        home = self.tmp_path / f"flwr-home-{name}"
        home.mkdir(exist_ok=True)
        preprocessed, results = str(site.nnunet_preprocessed), str(self.tmp_path / f"{name}-results")
        extra = {**site.environ(), **(env or {})}
        if not self.secure:
            folders = f"nnunet-preprocessed='{preprocessed}' nnunet-results='{results}' site-name='{name}'"
            command = [
                str(BIN / "flower-supernode"), "--insecure", "--superlink", f"{HOST}:{self.link_port}", *own,
                "--node-config", f"{folders} {node_config}".strip(),
            ]  # fmt: skip
        elif root_certificates:
            node_key = self.certs / (key or site.name)
            command = ["bash", str(CONFIGS / "supernode.sh"), *own]
            extra.update(
                SUPERLINK=f"{HOST}:{self.link_port}",
                CA_CERT=str(self.certs / "ca.crt"),
                NODE_KEY=str(node_key),
                PREPROCESSED=preprocessed,
                RESULTS=results,
                SITE_NAME=name,
            )
        else:
            node_key = self.certs / (key or site.name)
            command = [
                str(BIN / "flower-supernode"), "--superlink", f"{HOST}:{self.link_port}",
                "--auth-supernode-private-key", str(node_key),
                "--node-config", f"nnunet-preprocessed='{preprocessed}' nnunet-results='{results}' site-name='{name}'",
                "--max-retries", "2", *own,
            ]  # fmt: skip
        service = self.start(name, command, self.environment(home, **extra))
        service.port = port
        self.supernodes[name] = service
        if wait:
            wait_for_port(port, service.process)
        return service

    def start_clientapp_exec(self, name: str, *, poll: float | None = None) -> Service:
        """``flwr-nnunet clientapp-exec`` beside SuperNode ``name``, in its environment, as ``supernode.sh`` starts
        it (log: ``<name>-exec.log``); ``poll``: its seconds between two claims."""
        node = self.supernodes[name]
        command = [
            sys.executable, "-m", "flwr_nnunet.cli", "clientapp-exec",
            "--runtime-api-address", f"{HOST}:{node.port}", "--parent", str(node.process.pid),
            *(["--poll", str(poll)] if poll is not None else []),
        ]  # fmt: skip
        return self.start(f"{name}-exec", command, dict(node.env or {}))

    def start_supernodes(self, sites: Sequence[DemoSite]) -> list[Service]:
        """One SuperNode per site (:meth:`start_supernode`), all started before waiting for their Runtime APIs."""
        services = [self.start_supernode(site, wait=False) for site in sites]
        for service in services:
            wait_for_port(service.port, service.process)
        return services

    # -------------------------------------------------------------- flwr CLI
    def write_connection(self) -> None:
        """The researcher's ``$FLWR_HOME/config.toml``: one connection to this SuperLink, the default.

        Secure: ``configs/deployment/flwr-config.toml`` with this SuperLink's address and CA certificate.
        """
        if self.secure:
            text = (CONFIGS / "flwr-config.toml").read_text()
            text = text.replace('"hospitals"', f'"{CONNECTION}"').replace(
                "superlink.hospitals", f"superlink.{CONNECTION}"
            )
            text = text.replace("coordinator.example.org:8000", f"{HOST}:{self.link_port}")
            text = text.replace("/etc/flwr-nnunet/ca.crt", str(self.certs / "ca.crt"))
        else:
            text = (
                f'[superlink]\ndefault = "{CONNECTION}"\n\n'
                f'[superlink.{CONNECTION}]\naddress = "{HOST}:{self.link_port}"\ninsecure = true\n'
            )
        (self.flwr_home / "config.toml").write_text(text)

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI as the researcher does, against this deployment's FLWR_HOME."""
        return self.command([str(BIN / "flwr"), *args], timeout=timeout)

    def command(self, command: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a command (``flwr``, a guide script) in the researcher's environment."""
        return subprocess.run(
            command,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.environment(self.flwr_home),
            cwd=self.tmp_path,
        )

    def register(self, *names: str) -> dict[str, int]:
        """``configs/deployment/register_supernodes.sh <connection> <certs>/<name>.pub ...``; name -> node id
        (from ``SuperNode <id> registered successfully``, one line per key in order)."""
        keys = [str(self.certs / f"{name}.pub") for name in names]
        result = self.command(["bash", str(CONFIGS / "register_supernodes.sh"), CONNECTION, *keys])
        assert result.returncode == 0, f"register_supernodes.sh failed:\n{result.stdout}\n{result.stderr}"
        ids = [int(found) for found in re.findall(r"SuperNode (\d+) registered", result.stdout)]
        assert len(ids) == len(names), f"register_supernodes.sh printed:\n{result.stdout}"
        return dict(zip(names, ids, strict=True))

    def node_status(self) -> dict[int, str]:
        """Registered SuperNode id -> status (``online``, ``offline``, ...) from ``flwr supernode ls --format=json``."""
        result = self.flwr("supernode", "ls", CONNECTION, "--format=json")
        assert result.returncode == 0, f"flwr supernode ls failed:\n{result.stdout}\n{result.stderr}"
        return {int(node["node-id"]): str(node["status"]) for node in json.loads(result.stdout)["nodes"]}

    def submit(self, run_config: Mapping[str, object]) -> str:
        """``flwr run <repo> <connection> --run-config <tmp_path>/run.toml --format=json``: the run config written
        to ``run.toml`` (the researcher's file; Flower takes one TOML file and no key-value pairs beside it); the
        run id."""
        path = self.tmp_path / "run.toml"
        path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in run_config.items()))
        submitted = self.flwr("run", str(REPO), CONNECTION, "--run-config", str(path), "--format=json")
        answer = json.loads(submitted.stdout) if submitted.returncode == 0 else {}
        assert "run-id" in answer, f"flwr run failed:\n{submitted.stdout}\n{submitted.stderr}"
        return str(answer["run-id"])

    def run_status(self, run_id: str) -> str:
        """The run's status as ``flwr ls <connection> --format=json`` reports it (e.g. ``finished:completed``)."""
        result = self.flwr("ls", CONNECTION, "--format=json", "--run-id", run_id)
        assert result.returncode == 0, f"flwr ls failed:\n{result.stdout}\n{result.stderr}"
        runs = json.loads(result.stdout)["runs"]
        return str(runs[0]["status"]) if runs else "unknown"

    def wait_until_finished(self, run_id: str, done: Path, timeout: float = RUN_TIMEOUT_S) -> str:
        """The run's status once it has finished (or ``timeout`` passed); fail at once if a service died.

        ``flwr ls`` (a process: 1.7 s of CPU, which the sites' training needs) runs every :data:`STATUS_POLL_S`
        seconds, and as soon as the file ``done`` (the run's ``checkpoint_final.pth``) appears.
        """
        deadline = time.monotonic() + timeout
        status, asked = self.run_status(run_id), time.monotonic()
        while not status.startswith("finished") and time.monotonic() < deadline:
            for service in self.live_services():
                assert service.process.poll() is None, f"{service.name} exited with {service.process.returncode}"
            time.sleep(1)
            if done.exists() or time.monotonic() - asked >= STATUS_POLL_S:
                status, asked = self.run_status(run_id), time.monotonic()
        return status

    def server_log(self, run_id: str) -> str:
        """The ServerApp's log of a run: ``flwr log <run-id> <connection> --show`` (also kept in
        ``<tmp_path>/serverapp-<run-id>.log``)."""
        result = self.flwr("log", run_id, CONNECTION, "--show", timeout=120)
        (self.tmp_path / f"serverapp-{run_id}.log").write_text(result.stdout + result.stderr)
        return result.stdout + result.stderr

    def live_services(self) -> list[Service]:
        """The services the test expects to be running: the current SuperLink and SuperNode of each name."""
        return [service for service in [self.superlink, *self.supernodes.values()] if service is not None]

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

        def ours() -> dict[int, int]:
            return {
                pid: ticks for pid, ticks in started.items() if (stat := _stat(pid)) is not None and stat[1] == ticks
            }

        deadline = time.monotonic() + 10
        while ours() and time.monotonic() < deadline:
            time.sleep(0.2)
        kill_processes(ours())
        if self.state.parent != self.tmp_path:
            shutil.rmtree(self.state, ignore_errors=True)


@contextmanager
def running_deployment(tmp_path: Path, request: pytest.FixtureRequest, **options: bool) -> Iterator[Deployment]:
    """A :class:`Deployment` (``options``: its keywords); always stopped with everything it started, its logs
    printed if the test failed. The SuperLink is not started: secure tests make certificates first."""
    failures = request.session.testsfailed
    deployment = Deployment(tmp_path, **options)
    try:
        yield deployment
    finally:
        deployment.stop()
        if request.session.testsfailed > failures or sys.exc_info()[0] is not None:
            print(deployment.logs())


def run_config(demo: DemoDataset, **overrides: object) -> dict[str, object]:
    """The guide's ``configs/deployment.toml`` pointed at the demo, with :data:`TINY_BUDGET` and ``overrides``
    (``_`` in names becomes ``-``): `flwr run` refuses a key the app does not know."""
    guide = tomllib.loads(RUN_CONFIG_FILE.read_text())
    extra = {key.replace("_", "-"): value for key, value in overrides.items()}
    return {**guide, **demo.run_config(), **TINY_BUDGET, **extra}


def model_folder(demo: DemoDataset) -> NnUNetModelFolder:
    """The server's nnU-Net model folder of the demo (where the global checkpoints go)."""
    plans = json.loads(demo.plans_file.read_text())
    dataset_json = json.loads((demo.server.preprocessed_dataset_folder / "dataset.json").read_text())
    return NnUNetModelFolder.in_results(demo.server.nnunet_results, plans, dataset_json, None, demo.configuration)


def site_spec(deployment: Deployment, demo: DemoDataset, site: DemoSite) -> SiteSpec:
    """The :class:`SiteSpec` a deployed site's ClientApp builds from its node config."""
    return SiteSpec(
        name=site.name,
        dataset=demo.dataset_name,
        nnunet_preprocessed=site.nnunet_preprocessed,
        nnunet_results=deployment.site_results(site),
        configuration=demo.configuration,
    )
