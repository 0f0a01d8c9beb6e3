"""The server side of a run: demo data, global nnU-Net network, strategy, rounds.

``server_app.py`` calls :func:`run_server`. It reads the run config
(``[tool.flwr.app.config]``, schema in :mod:`flwr_nnunet.apps.run_config`),
makes the synthetic demo data when asked, builds the global network from the
shared plans exactly as the sites' trainer class builds it, runs the strategy,
and leaves behind the nnU-Net model folder with ``flwr_history.json`` and
``flwr_progress.png`` (:mod:`flwr_nnunet.apps.history`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.supercore import log

from flwr_nnunet.apps.history import RunHistory
from flwr_nnunet.apps.run_config import RunSettings
from flwr_nnunet.nnunet.networks import build_trainer_network

__all__ = ["build_strategy", "prepare_data", "run_server"]


def _read_json(path: Path, fix: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {fix}")
    return json.loads(path.read_text())


def prepare_data(settings: RunSettings) -> None:
    """With ``make-demo``: make the demo under ``data-root`` unless one is there, and check it fits the run config.

    Raises
    ------
    ValueError
        If the demo under ``data-root`` is not the dataset / configuration the run config names.
    """
    if not settings.make_demo:
        return
    from flwr_nnunet.demo.data import load_demo_dataset, make_demo_dataset

    try:
        demo = load_demo_dataset(settings.data_root)
    except FileNotFoundError:
        dims = 3 if settings.demo_3d else 2
        demo = make_demo_dataset(settings.data_root, num_sites=settings.demo_sites, dims=dims)
    wanted = (settings.dataset, settings.configuration)
    if (demo.dataset_name, demo.configuration) != wanted:
        raise ValueError(
            f"the demo under {demo.root} is {demo.dataset_name} / {demo.configuration} but the run config asks for "
            f"{wanted[0]} / {wanted[1]}: set run-config dataset / configuration to match, or point data-root at "
            "another folder (the demo is made there)"
        )


def build_strategy(settings: RunSettings, run_config: Mapping[str, Any]) -> Any:
    """The global network (from the shared plans) and the named strategy around it, with its model folder."""
    from flwr_nnunet.nnunet.model_folder import NnUNetModelFolder
    from flwr_nnunet.strategy.registry import strategy_from_name

    folder = settings.server_dataset_folder
    fix = "run with make-demo=true, or put the federation's plans, dataset.json and dataset_fingerprint.json there"
    plans = _read_json(folder / f"{settings.plans}.json", fix)
    dataset_json = _read_json(folder / "dataset.json", fix)
    fingerprint = _read_json(folder / "dataset_fingerprint.json", fix)
    torch.manual_seed(settings.seed)
    network = build_trainer_network(plans, dataset_json, settings.configuration, settings.trainer)
    dims = len(plans["configurations"][settings.configuration]["patch_size"])
    model_folder = NnUNetModelFolder.in_results(
        settings.results_dir,
        plans,
        dataset_json,
        fingerprint,
        settings.configuration,
        trainer_name=settings.trainer,
        inference_allowed_mirroring_axes=tuple(range(dims)),
    )
    options = dict(settings.strategy_options)
    if settings.strategy.replace("-", "").replace("_", "").lower() == "fedprox":
        options.setdefault("proximal_mu", settings.proximal_mu)
    return strategy_from_name(
        settings.strategy,
        network=network,
        dp=settings.dp or None,
        dp_options=settings.dp_options,
        plans=plans,
        model_folder=model_folder,
        run_config=dict(run_config),
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=settings.min_train_nodes,
        min_evaluate_nodes=settings.min_evaluate_nodes,
        min_available_nodes=settings.min_available_nodes,
        **options,
    )


def _core(strategy: Any) -> Any:
    """The NnUNetFedAvg inside a DP wrapper (or the strategy itself)."""
    return getattr(strategy, "strategy", strategy)


def run_server(grid: Any, context: Any) -> Any:
    """The ServerApp's main: data, global network, strategy, rounds, model folder, history and plot.

    Returns Flower's ``Result`` of the strategy.
    """
    from flwr.app import ConfigRecord

    settings = RunSettings.from_run_config(context.run_config)
    prepare_data(settings)
    strategy = build_strategy(settings, context.run_config)
    core = _core(strategy)
    history = RunHistory(core.model_folder.path)
    core.train_metrics_aggr_fn = history.train_metrics
    core.evaluate_metrics_aggr_fn = history.evaluate_metrics
    core.post_round_fn = history.end_round
    if settings.resume:
        history.load()
        strategy.resume(context.run_config)
    log(
        INFO,
        "flwr-nnunet: %s, %s, %d round(s) x %d local epoch(s), strategy %s; global model in %s",
        settings.dataset,
        settings.configuration,
        settings.num_rounds,
        settings.local_epochs,
        settings.strategy,
        core.model_folder.path,
    )
    config = ConfigRecord(settings.train_config())
    result = strategy.start(
        grid,
        num_rounds=settings.num_rounds,
        timeout=settings.round_timeout,
        train_config=config,
        evaluate_config=ConfigRecord(settings.train_config()),
    )
    history.write()
    return result
