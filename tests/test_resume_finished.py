"""resume=true with planning='federated' keeps the run's plans: a finished run says so in one line and changes
nothing; plans on the server other than the checkpoints' are refused before they are sent to any site."""

from __future__ import annotations

import json
import logging

import pytest
from flwr.app import Context, RecordDict

from flwr_nnunet.apps.config_errors import ServerConfigError
from flwr_nnunet.apps.server import build_strategy, read_settings, run_server
from flwr_nnunet.demo.data import make_demo_dataset
from flwr_nnunet.demo.run_data import DEMO_RUN_DATA


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _snapshot(folder):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_resume_of_a_finished_run_says_so_and_writes_nothing(tmp_path):
    config = {"data-root": str(tmp_path / "demo"), "demo-sites": 2, "num-server-rounds": 2}
    settings = read_settings(config)
    assert settings.planning == "federated"  # the default: the run's plans are found, not planned again
    make_demo_dataset(settings.data_root, num_sites=2)  # as the run's planning phase leaves it
    plans = settings.server_dataset_folder / "nnUNetPlans.json"
    plans_before = (plans.stat().st_mtime_ns, plans.read_bytes())
    strategy = build_strategy(settings, config)
    checkpoints = strategy.checkpoints
    checkpoints.folder.write_metadata()
    for server_round in (1, 2):
        checkpoints.end_round(server_round, strategy)
    checkpoints.save("final", 2)
    folder = checkpoints.folder.path
    before = _snapshot(folder)
    assert folder / "fold_all" / "checkpoint_final.pth" in before

    handler = _Lines()
    logging.getLogger("flwr").addHandler(handler)
    try:
        for rounds in (2, 1):  # num-server-rounds reached, or passed
            context = Context(
                run_id=1,
                node_id=0,
                node_config={},
                state=RecordDict(),
                run_config={**config, "num-server-rounds": rounds, "resume": True},
            )
            result = run_server(None, context, DEMO_RUN_DATA)  # no grid: nothing may be sent
            assert len(result.arrays) > 0
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    finished = [line for line in handler.lines if "already finished" in line]
    assert len(finished) == 2, handler.lines
    assert f"the run in {folder} already finished (round 2, num-server-rounds=2): nothing to do" in finished[0]
    assert not [line for line in handler.lines if "continuing" in line or "wrote" in line], handler.lines
    assert _snapshot(folder) == before  # mtimes and bytes: checkpoint_final.pth, history and plot untouched
    assert (plans.stat().st_mtime_ns, plans.read_bytes()) == plans_before

    # the strategy API: resume() then start() with the rounds done (the round loop, strategy/rounds.py)
    again = build_strategy(settings, config)
    assert again.resume(config) == 2
    result = again.start(None, num_rounds=2)  # no grid: nothing may be sent
    assert len(result.arrays) > 0
    assert _snapshot(folder) == before

    # other plans on the server than the checkpoints': refused before any plans are sent (no grid is touched)
    other = json.loads(plans.read_text())
    other["configurations"]["2d"]["batch_size"] += 1
    plans.write_text(json.dumps(other))
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={**config, "num-server-rounds": 3, "resume": True},
    )
    with pytest.raises(ServerConfigError, match="resume=true: cannot resume .* trained with other plans"):
        run_server(None, context, DEMO_RUN_DATA)
    assert _snapshot(folder) == before
