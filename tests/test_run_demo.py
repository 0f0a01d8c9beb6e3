"""scripts/run_demo.py checks what it needs before it deletes anything, and finds its SuperLink by its own PID."""

from __future__ import annotations

import subprocess
import sys
import time

from flwr_local import run_demo


def _fake_superlink(home, port: int) -> subprocess.Popen:
    """A process whose arguments look like the local SuperLink `flwr run` starts for ``home``."""
    script = "import time; time.sleep(60)"
    arguments = ["flower-superlink", "--insecure", "--port", str(port)]
    arguments += ["--log-file", str(home / "local-superlink" / "superlink.log")]
    process = subprocess.Popen([sys.executable, "-c", script, *arguments])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.pid not in run_demo.superlink_pids(home):
        time.sleep(0.1)
    return process


def test_free_ports_and_the_environment_of_the_local_superlink(tmp_path):
    port = run_demo.free_port()
    assert 1024 < port < 65536
    env = run_demo.local_superlink_environment(tmp_path, port, port + 1)
    assert env["FLWR_HOME"] == str(tmp_path)
    assert env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] == str(port)
    assert env["FLWR_LOCAL_CONTROL_API_PORT"] == str(port + 1)
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_a_superlink_is_found_and_stopped_by_its_own_home_and_port(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # ps must not cut the arguments that identify the SuperLink
    ours, other = tmp_path / "ours", tmp_path / "other"
    mine = _fake_superlink(ours, 40001)
    foreign = _fake_superlink(other, 40001)
    try:
        assert run_demo.superlink_pids(ours) == [mine.pid]
        assert run_demo.superlink_pids(ours, 40002) == []
        assert run_demo.stop_superlink(ours, 40001) == [mine.pid]
        assert mine.wait(timeout=10) is not None
        assert foreign.poll() is None  # another FLWR_HOME's SuperLink is never touched
    finally:
        for process in (mine, foreign):
            process.kill()
            process.wait()


def test_a_leftover_superlink_stops_the_demo_before_anything_is_deleted(tmp_path, capsys):
    workdir = tmp_path / "demo"
    results = workdir / "data" / "server" / "nnUNet_results"
    results.mkdir(parents=True)
    (results / "keep.txt").write_text("the previous global model")
    leftover = _fake_superlink(workdir / "flwr-home", 40003)
    try:
        assert run_demo.main(["--workdir", str(workdir)]) == 2
    finally:
        leftover.kill()
        leftover.wait()
    error = capsys.readouterr().err
    assert f"is still running (PID {leftover.pid})" in error and f"kill {leftover.pid}" in error
    assert (results / "keep.txt").read_text() == "the previous global model"


def test_an_unwritable_workdir_is_refused(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")  # unwritable even for root
    assert run_demo.main(["--workdir", str(tmp_path / "a-file" / "demo")]) == 2
    assert "pick a writable folder" in capsys.readouterr().err


def test_bad_options_are_refused_and_3d_budget_comes_from_its_config(tmp_path, capsys):
    assert run_demo.main(["--workdir", str(tmp_path), "--sites", "5", "--rounds", "0"]) == 2
    error = capsys.readouterr().err
    assert "--sites must be 2 or 3" in error and "--rounds must be at least 1" in error
    args = run_demo.parse_args(["--3d"])
    budget = run_demo.budget_defaults(3)
    assert (args.rounds, args.iterations) == (budget["rounds"], budget["iterations"])
    assert run_demo.parse_args(["--3d", "--rounds", "2"]).rounds == 2
    assert run_demo.parse_args([]).rounds == 8
