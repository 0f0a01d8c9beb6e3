"""Server-side configuration errors end the run with one log line naming the problem and the fix."""

from __future__ import annotations

import importlib.util
import json
import logging
from logging import ERROR
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.supercore import log

from flwr_nnunet.apps.config_errors import ServerConfigError, install_one_line_errors

_SPEC = importlib.util.spec_from_file_location("server_app", Path(__file__).resolve().parents[1] / "server_app.py")
server_app = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(server_app)


def _context(**run_config) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def _server_app_error(**run_config) -> ServerConfigError:
    with pytest.raises(ServerConfigError) as raised:
        server_app.app(None, _context(**run_config))  # the ServerApp as Flower calls it
    message = str(raised.value)
    assert "\n" not in message
    return raised.value


def test_3d_configuration_on_the_2d_demo_names_demo_3d_and_makes_no_data(tmp_path):
    error = _server_app_error(**{"data-root": str(tmp_path / "demo"), "configuration": "3d_fullres"})
    assert "'3d_fullres' does not fit the 2D demo" in str(error)
    assert "demo-3d=true" in str(error)
    assert not (tmp_path / "demo").exists()  # found before any data were made


def test_2d_configuration_on_the_3d_demo_names_the_fix(tmp_path):
    error = _server_app_error(**{"data-root": str(tmp_path / "demo"), "demo-3d": True})
    assert "configuration='3d_fullres'" in str(error) and "configs/demo-3d.toml" in str(error)


def test_unknown_dataset_with_make_demo(tmp_path):
    error = _server_app_error(**{"data-root": str(tmp_path), "dataset": "Dataset123_Liver"})
    assert "make-demo=false" in str(error) and "site-K/nnUNet_raw/Dataset123_Liver" in str(error)


def test_unknown_dataset_without_make_demo(tmp_path):
    error = _server_app_error(
        **{"data-root": str(tmp_path), "dataset": "Dataset123_Liver", "make-demo": False, "planning": "fixed"}
    )
    assert "no dataset 'Dataset123_Liver' on the server" in str(error) and "data-root" in str(error)
    assert "planning='federated' plans from the sites' raw data" in str(error)


def test_missing_plans(tmp_path):
    folder = tmp_path / "server" / "nnUNet_preprocessed" / "Dataset987_FedDemo"
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({}))
    error = _server_app_error(**{"data-root": str(tmp_path), "make-demo": False, "planning": "fixed"})
    assert f"{folder / 'nnUNetPlans.json'} not found" in str(error)


def test_configuration_missing_from_the_plans(tmp_path):
    folder = tmp_path / "server" / "nnUNet_preprocessed" / "Dataset987_FedDemo"
    folder.mkdir(parents=True)
    for name in ("dataset.json", "dataset_fingerprint.json"):
        (folder / name).write_text("{}")
    (folder / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"2d": {}}}))
    error = _server_app_error(
        **{"data-root": str(tmp_path), "make-demo": False, "planning": "fixed", "configuration": "3d_lowres"}
    )
    assert "no configuration '3d_lowres' (they have 2d)" in str(error)


def test_bad_value_and_unknown_strategy(tmp_path):
    assert "num-server-rounds" in str(_server_app_error(**{"num-server-rounds": "many"}))
    error = _server_app_error(**{"data-root": str(tmp_path / "x"), "strategy": "fedfoo"})
    assert "unknown strategy 'fedfoo'" in str(error) and "fedadam" in str(error)
    assert not (tmp_path / "x").exists()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(logging.Formatter("%(levelname)s %(message)s").format(record).splitlines())


@pytest.fixture
def flower_log():
    logger = logging.getLogger("flwr")
    handler = _Records()
    logger.addHandler(handler)
    installed = install_one_line_errors()
    assert install_one_line_errors() is installed  # idempotent
    yield handler
    logger.removeHandler(handler)
    logger.removeFilter(installed)


def _as_flower_reports(error: BaseException) -> None:
    """What flwr/simulation/app.py and flwr_exit log for an exception out of the ServerApp."""
    log(ERROR, "%s raised an exception", "Simulation", exc_info=error)
    log(ERROR, "Exit Code: 700\nAn unhandled exception occurred when running the simulation.")


def test_flower_logs_a_config_error_as_one_line(tmp_path, flower_log):
    """The ServerApp logs the line itself (a simulation run from Python logs nothing of it); Flower's report is dropped."""
    try:
        server_app.app(None, _context(**{"data-root": str(tmp_path), "configuration": "3d_fullres"}))
    except ServerConfigError as error:
        assert len(flower_log.lines) == 1, flower_log.lines  # before Flower reports anything
        try:  # the simulation re-raises it from its own frame
            raise RuntimeError("An error was encountered. Ending simulation.") from error
        except RuntimeError as wrapped:
            _as_flower_reports(wrapped)
    assert len(flower_log.lines) == 1, flower_log.lines
    assert flower_log.lines[0].startswith("ERROR flwr-nnunet: configuration '3d_fullres' does not fit the 2D demo")
    assert "demo-3d=true" in flower_log.lines[0]


def test_a_config_error_raised_elsewhere_is_made_one_line_by_flower_s_report(flower_log):
    try:
        raise RuntimeError("An error was encountered. Ending simulation.") from ServerConfigError("bad; fix it")
    except RuntimeError as wrapped:
        _as_flower_reports(wrapped)
    assert flower_log.lines == ["ERROR flwr-nnunet: bad; fix it"]


def test_other_exceptions_keep_their_traceback(flower_log):
    try:
        raise KeyError("a bug")
    except KeyError as error:
        _as_flower_reports(error)
    assert any(line.startswith("Traceback") for line in flower_log.lines)
    assert any(line == "ERROR Exit Code: 700" for line in flower_log.lines)


@pytest.mark.slow
def test_flwr_run_with_a_bad_config_fails_the_run_in_one_line(tmp_path):
    from flwr_local import LocalFlower

    with LocalFlower(tmp_path / "flwr-home") as flower:
        done = flower.run(
            f"flwr run . --stream -c \"configuration='3d_fullres' data-root='{tmp_path / 'demo'}'\"", timeout=300
        )
        status = flower.status_of(done.stdout)
    assert status == "finished:failed", done.stdout[-3000:]
    assert "Traceback" not in done.stdout, done.stdout[-3000:]
    errors = [line for line in done.stdout.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "flwr-nnunet: configuration '3d_fullres'" in errors[0], errors
    assert "demo-3d=true" in errors[0]


def test_a_data_root_with_other_data_is_one_line_and_left_alone(tmp_path):
    (tmp_path / "site-0").mkdir()
    (tmp_path / "site-0" / "mine.txt").write_text("not a demo")
    error = _server_app_error(**{"data-root": str(tmp_path)})
    assert str(error).startswith("make-demo=true: ") and "not a demo" in str(error)
    assert (tmp_path / "site-0" / "mine.txt").read_text() == "not a demo"


def test_make_demo_without_data_plugged_in_is_one_line_and_makes_nothing(tmp_path):
    """run_server called without the demo server_app.py plugs in: make-demo=true names the fix, makes nothing."""
    from flwr_nnunet.apps.server import run_server

    with pytest.raises(ServerConfigError, match="plugs in no data to make") as raised:
        run_server(None, _context(**{"data-root": str(tmp_path / "demo")}))
    assert "\n" not in str(raised.value) and "make-demo=false" in str(raised.value)
    assert not (tmp_path / "demo").exists()
