"""Test helpers: `flwr` commands on a local SuperLink of the test's own (temp FLWR_HOME, free ports, 127.0.0.1).

They reuse ``scripts/run_demo.py``'s helpers, so the tests exercise the same port choice and the
same stop-by-PID the demo uses.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[1]


def _load_run_demo():
    spec = importlib.util.spec_from_file_location("run_demo", REPO / "scripts" / "run_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("run_demo", module)
    spec.loader.exec_module(module)
    return module


run_demo = _load_run_demo()


class LocalFlower:
    """`flwr` commands run with ``FLWR_HOME=<home>`` and this object's own local SuperLink ports.

    Use it as a context manager: on exit the SuperLink `flwr run` started (if any) is stopped by its PID.
    """

    def __init__(self, home: Path, extra_env: dict[str, str] | None = None) -> None:
        self.home = Path(home)
        self.http_port = run_demo.free_port()
        self.control_port = run_demo.free_port()
        while self.control_port == self.http_port:
            self.control_port = run_demo.free_port()
        self.env = run_demo.local_superlink_environment(self.home, self.http_port, self.control_port)
        self.env.update(extra_env or {})

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        left = run_demo.superlink_pids(self.home)
        assert not left, f"a SuperLink of {self.home} is still running after the test: PID {left}"

    def stop(self) -> list[int]:
        """Stop this object's SuperLink by its PID; return the PIDs stopped."""
        return run_demo.stop_superlink(self.home, self.http_port)

    def run(self, command: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run one shell command line in this environment; stdout and stderr together in ``.stdout``."""
        return subprocess.run(
            command,
            check=False,
            shell=True,
            cwd=cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            executable="/bin/bash",
        )

    def status_of(self, output: str) -> str:
        """The status (``finished:completed``...) of the run whose `flwr run` printed ``output``."""
        started = re.search(r"Successfully started run (\d+)", output)
        assert started, f"`flwr run` started no run:\n{output[-3000:]}"
        return run_demo.run_status(self.env, started.group(1))

    def runs(self) -> list[dict]:
        """Every run this SuperLink knows (``flwr ls --format=json``)."""
        done = self.run("flwr ls --format=json")
        return json.loads(done.stdout)["runs"]
