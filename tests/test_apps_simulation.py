"""A real Flower simulation through server_app.py and client_app.py: 2 sites, 2 rounds, tiny plans."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flwr_nnunet.apps.history import HISTORY_FILE, PROGRESS_FILE
from flwr_nnunet.apps.run_config import RUN_CONFIG_KEYS, RunSettings, parse_options
from flwr_nnunet.demo.data import load_demo_dataset, make_demo_dataset
from flwr_nnunet.demo.heldout import predict_test_cases

REPO = Path(__file__).resolve().parents[1]


def run_app_simulation(override: dict, num_supernodes: int) -> None:
    """What `flwr run .` does in its simulation process: load both apps from the project, fuse the run config."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    run = Run.create_empty(run_id=int.from_bytes(os.urandom(7), "little"))
    run.override_config = dict(override)
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    context = Context(
        run_id=run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=get_fused_config_from_dir(REPO, run.override_config),
    )
    _run_simulation(
        server_app_attr="server_app:app",
        client_app_attr="client_app:app",
        num_supernodes=num_supernodes,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}, "init_args": {"num_cpus": 1}},
        app_dir=str(REPO),
        run=run,
        server_app_context=context,
        is_app=True,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
    )


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory):
    """3 sites; site-2 re-planned on its own (other batch size), so it must refuse every round."""
    root = tmp_path_factory.mktemp("federation")
    demo = make_demo_dataset(root / "data", num_sites=3)
    plans_file = demo.sites[2].preprocessed_dataset_folder / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"][demo.configuration]["batch_size"] = 3
    plans_file.write_text(json.dumps(plans))
    override = {
        "data-root": str(demo.root),
        "planning": "fixed",  # the plans as they are: site-2's stay its own
        "num-server-rounds": 2,
        "iterations-per-epoch": 12,
        "val-iterations-per-epoch": 4,
        "device": "cpu",
        "demo-sites": 3,
    }
    logs = logging.getLogger("flwr")
    handler = _Collect()
    logs.addHandler(handler)
    try:
        run_app_simulation(override, num_supernodes=3)
    finally:
        logs.removeHandler(handler)
    model = demo.server.nnunet_results / demo.dataset_name / f"nnUNetTrainer__nnUNetPlans__{demo.configuration}"
    return demo, model, handler.lines


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _organ_fraction(site) -> float:
    from PIL import Image

    labels = [np.array(Image.open(site.labels_ts / f"{case}.png")) for case in site.test_cases]
    return float(np.mean([np.mean(label == 1) for label in labels]))


@pytest.mark.slow
def test_simulation_trains_the_good_sites_and_leaves_a_history(federated_run):
    demo, model, _ = federated_run
    history = json.loads((model / HISTORY_FILE).read_text())["rounds"]
    assert sorted(history) == ["1", "2"]
    for stage in ("train", "evaluate"):
        assert sorted(history["2"][stage]["sites"]) == ["site-0", "site-1"]
    losses = [history[r]["train"]["aggregated"]["train-loss"] for r in ("1", "2")]
    assert losses[1] < losses[0]
    # Calling every pixel "organ" scores 2p / (1 + p) on organ Dice (p: organ fraction); a random model scores less.
    ceiling = max(2 * p / (1 + p) for p in map(_organ_fraction, demo.sites[:2]))
    assert history["2"]["evaluate"]["aggregated"]["dice-per-class"][0] > ceiling + 0.3
    assert history["2"]["train"]["aggregated"]["pseudo-dice-per-class"][0] > ceiling + 0.3
    assert (model / PROGRESS_FILE).stat().st_size > 10_000


@pytest.mark.slow
def test_site_with_other_plans_is_refused_with_the_fix_and_the_run_goes_on(federated_run):
    _, model, lines = federated_run
    refusals = [line for line in lines if "site-2" in line and "differs from the server's plans" in line]
    assert len(refusals) == 4  # 2 rounds x (train, evaluate)
    assert "nnUNetv2_preprocess -d 987 -plans_name nnUNetPlans -c 2d" in refusals[0]
    assert (model / "fold_all" / "checkpoint_final.pth").is_file()


@pytest.mark.slow
def test_global_checkpoint_predicts_with_nnunetv2_predict(federated_run, tmp_path):
    demo, model, _ = federated_run
    checkpoint = torch.load(model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    site = demo.sites[1]
    output = tmp_path / "predictions"
    scores = predict_test_cases(demo, site, demo.server.nnunet_results, output, fold="all")
    assert sorted(p.name for p in output.glob("*.png")) == sorted(f"{c}.png" for c in site.test_cases)
    ceiling = 2 * _organ_fraction(site) / (1 + _organ_fraction(site))
    assert scores["organ"] > ceiling + 0.3


def app_config() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_run_config_keys_are_documented_and_the_example_configs_use_only_them():
    import tomllib

    keys = set(app_config())
    assert keys == set(RUN_CONFIG_KEYS)
    for path in sorted((REPO / "configs").glob("*.toml")):
        assert set(tomllib.loads(path.read_text())) <= keys, path.name


def test_run_settings_from_the_default_run_config(tmp_path):
    settings = RunSettings.from_run_config(
        {**app_config(), "data-root": str(tmp_path), "strategy-options": "eta=0.1 x=a"}
    )
    assert (settings.num_rounds, settings.local_epochs, settings.make_demo) == (8, 1, True)
    assert settings.strategy_options == {"eta": 0.1, "x": "a"}
    assert settings.results_dir == tmp_path / "server" / "nnUNet_results"
    assert settings.train_config()["num-epochs"] == 8 and "proximal-mu" not in settings.train_config()
    assert RunSettings.from_run_config({"proximal-mu": 0.01}).train_config()["proximal-mu"] == 0.01
    with pytest.raises(ValueError, match="name=value"):
        parse_options("eta")


@pytest.mark.slow
def test_resumed_run_continues_the_rounds_and_the_sites(tmp_path, flwr_log):
    """make-demo=true, planning='federated' (the defaults): the run plans; the resumed run sends those plans again."""
    root = tmp_path / "data"
    common = {"data-root": str(root), "iterations-per-epoch": 3, "val-iterations-per-epoch": 1}
    run_app_simulation({**common, "num-server-rounds": 1, "demo-sites": 2}, num_supernodes=2)
    demo = load_demo_dataset(root)
    plans = demo.plans_file.read_bytes()
    lost = demo.sites[1].preprocessed_dataset_folder / "nnUNetPlans_2d"
    shutil.rmtree(lost)  # site-1 lost its preprocessed cases: the resent plans preprocess them again
    run_app_simulation({**common, "num-server-rounds": 2, "demo-sites": 2, "resume": True}, num_supernodes=2)
    assert demo.plans_file.read_bytes() == plans
    assert {p.stem for p in lost.glob("*.pkl")} == set(demo.sites[1].training_cases)
    lines = [record.getMessage() for record in flwr_log]
    assert sum("statistics (10000 foreground samples per case)" in line for line in lines) == 1, lines
    assert sum("resume: the run's plans in" in line and "not planned again" in line for line in lines) == 1
    model = demo.server.nnunet_results / demo.dataset_name / "nnUNetTrainer__nnUNetPlans__2d"
    history = json.loads((model / HISTORY_FILE).read_text())["rounds"]
    assert sorted(history) == ["1", "2"]
    assert [history["2"]["train"]["sites"][s]["epoch"] for s in ("site-0", "site-1")] == [2, 2]
    checkpoint = torch.load(model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["flwr_nnunet"]["server_round"] == 2
