"""The server side of a run: run config, global nnU-Net network, strategy, history and progress plot.

``server_app.py`` calls :func:`run_server`. It reads the run config
(``[tool.flwr.app.config]``, see :data:`RUN_CONFIG_KEYS`), makes the synthetic
demo data when asked, builds the global network from the shared plans exactly
as the sites' trainer class builds it, runs the strategy, and leaves behind the
nnU-Net model folder with ``flwr_history.json`` and ``flwr_progress.png``.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.supercore import log

from flwr_nnunet.apps.client import data_root
from flwr_nnunet.nnunet.networks import build_trainer_network

__all__ = ["HISTORY_FILE", "PROGRESS_FILE", "RUN_CONFIG_KEYS", "RunHistory", "RunSettings", "run_server"]

HISTORY_FILE = "flwr_history.json"
PROGRESS_FILE = "flwr_progress.png"


RUN_CONFIG_KEYS: dict[str, str] = {
    "num-server-rounds": "federated rounds (the run's total; a resumed run continues to it)",
    "local-epochs": "nnU-Net epochs each site trains per round",
    "iterations-per-epoch": "training batches per epoch (0: the trainer's own, 250)",
    "val-iterations-per-epoch": "pseudo-Dice batches per epoch (0: the trainer's own, 50)",
    "strategy": "fedavg, fedavgm, fedprox, fedadagrad, fedadam, fedyogi, fedmedian, fedtrimmedavg, krum, "
    "multikrum, bulyan, qfedavg",
    "strategy-options": "extra strategy arguments, 'name=value' separated by spaces (e.g. 'eta=0.01 beta_1=0.9')",
    "proximal-mu": "FedProx coefficient mu (> 0 adds mu/2 times the squared distance to the global weights to every "
    "site's loss, with any strategy)",
    "dp": "differential privacy wrapper: '', server-fixed, server-adaptive, client-fixed, client-adaptive",
    "dp-options": "DP wrapper arguments, 'name=value' separated by spaces (e.g. 'noise_multiplier=1.0 clipping_norm=10')",
    "fraction-train": "fraction of connected nodes sampled for training each round",
    "fraction-evaluate": "fraction of connected nodes sampled for evaluation each round",
    "min-train-nodes": "minimum nodes per training round",
    "min-evaluate-nodes": "minimum nodes per evaluation round",
    "min-available-nodes": "nodes to wait for before a round starts",
    "dataset": "nnU-Net dataset, Dataset<ID>_<Name> (the same at every site)",
    "configuration": "nnU-Net configuration (2d, 3d_fullres, ...)",
    "plans": "plans identifier (nnUNetPlans)",
    "trainer": "nnU-Net trainer class (nnUNetTrainer, nnUNetTrainerBN, nnUNetTrainerNoDeepSupervision, ...)",
    "fold": "split of each site's splits_final.json: train on 'train', evaluate on 'val' ('all': both on every case)",
    "data-root": "folder with server/ and site-K/ nnU-Net roots ('': $FLWR_HOME/flwr-nnunet-demo, or -demo-3d)",
    "results-dir": "nnUNet_results of the global model ('': <data-root>/server/nnUNet_results)",
    "make-demo": "make the synthetic demo under data-root if it is not there",
    "demo-3d": "make the demo with small 3D volumes (then set configuration='3d_fullres')",
    "demo-sites": "number of demo sites (2 or 3)",
    "resume": "continue a killed run from the model folder's last checkpoint",
    "seed": "seeds the global model's initialisation and every site's round",
    "device": "where the sites train: auto (CUDA when present), cpu or cuda (node-config 'device' overrides it)",
    "round-timeout": "seconds to wait for replies each round",
}
"""Every ``[tool.flwr.app.config]`` key this app reads, with its meaning."""


def parse_options(text: str) -> dict[str, Any]:
    """``'eta=0.01 beta_1=0.9 name=x'`` -> ``{'eta': 0.01, 'beta_1': 0.9, 'name': 'x'}`` (ints, floats, bools, strings).

    Raises
    ------
    ValueError
        For an item without ``=``.
    """
    options: dict[str, Any] = {}
    for item in shlex.split(text or ""):
        if "=" not in item:
            raise ValueError(f"option {item!r} is not of the form name=value")
        name, value = item.split("=", 1)
        options[name.strip()] = _value(value.strip())
    return options


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _convert(value: Any, default: Any) -> Any:
    """A run-config value as the type of the setting's default (option strings become dicts)."""
    if isinstance(default, dict):
        return parse_options(str(value))
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).strip().lower() == "true"
    return type(default)(value)


@dataclass(frozen=True)
class RunSettings:
    """The run config, typed (keys and meanings in :data:`RUN_CONFIG_KEYS`)."""

    num_rounds: int = 3
    local_epochs: int = 1
    iterations_per_epoch: int = 0
    val_iterations_per_epoch: int = 0
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    proximal_mu: float = 0.0
    dp: str = ""
    dp_options: dict[str, Any] = field(default_factory=dict)
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    dataset: str = "Dataset987_FedDemo"
    configuration: str = "2d"
    plans: str = "nnUNetPlans"
    trainer: str = "nnUNetTrainer"
    data_root: Path = Path()
    results_dir: Path = Path()
    make_demo: bool = True
    demo_3d: bool = False
    demo_sites: int = 3
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    round_timeout: float = 3600.0

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Typed settings from ``context.run_config`` (missing keys take the defaults)."""
        defaults, values = cls(), {}
        for name in (f.name for f in fields(cls) if f.name not in ("data_root", "results_dir")):
            key = "num-server-rounds" if name == "num_rounds" else name.replace("_", "-")
            if key in config:
                values[name] = _convert(config[key], getattr(defaults, name))
        root = data_root(config)
        results = str(config.get("results-dir", "") or "")
        values["data_root"] = root
        values["results_dir"] = Path(results).expanduser().absolute() if results else root / "server" / "nnUNet_results"
        return cls(**values)

    @property
    def server_dataset_folder(self) -> Path:
        """``<data-root>/server/nnUNet_preprocessed/<dataset>``: shared plans, dataset.json, fingerprint."""
        return self.data_root / "server" / "nnUNet_preprocessed" / self.dataset

    def train_config(self) -> dict[str, Any]:
        """What every site needs each round (sent in the train and evaluate ``ConfigRecord``)."""
        config: dict[str, Any] = {
            "local-epochs": self.local_epochs,
            "num-epochs": self.num_rounds * self.local_epochs,
            "iterations-per-epoch": self.iterations_per_epoch,
            "val-iterations-per-epoch": self.val_iterations_per_epoch,
            "seed": self.seed,
        }
        if self.proximal_mu > 0:
            config["proximal-mu"] = self.proximal_mu
        return config


class RunHistory:
    """Per-round aggregated and per-site metrics, written as JSON and plotted after every round.

    Its :meth:`train_metrics` / :meth:`evaluate_metrics` are the strategy's
    metric aggregation functions: they note each site's metrics (the site name
    travels in the reply's ``config`` record) and return Flower's weighted mean.

    Parameters
    ----------
    folder
        Where ``flwr_history.json`` and ``flwr_progress.png`` go (the model folder).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.rounds: dict[int, dict[str, Any]] = {}
        self._pending: dict[str, dict[str, Any]] = {}

    @property
    def json_file(self) -> Path:
        """``<folder>/flwr_history.json``."""
        return self.folder / HISTORY_FILE

    @property
    def plot_file(self) -> Path:
        """``<folder>/flwr_progress.png``."""
        return self.folder / PROGRESS_FILE

    def load(self) -> None:
        """Read an earlier run's history (for a resumed run)."""
        if self.json_file.is_file():
            self.rounds = {int(r): v for r, v in json.loads(self.json_file.read_text())["rounds"].items()}

    def _note(self, stage: str, records: Sequence[Any], weight_key: str) -> Any:
        from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

        sites = {}
        for index, record in enumerate(records):
            about = record.config_records.get("config")
            name = str(about.get("site-name", f"reply-{index}")) if about is not None else f"reply-{index}"
            sites[name] = {k: v for metrics in record.metric_records.values() for k, v in metrics.items()}
        aggregated = aggregate_metricrecords(list(records), weight_key)
        self._pending[stage] = {"aggregated": dict(aggregated), "sites": sites}
        return aggregated

    def train_metrics(self, records: Sequence[Any], weight_key: str) -> Any:
        """``train_metrics_aggr_fn``: note each site's training metrics, return the weighted mean."""
        return self._note("train", records, weight_key)

    def evaluate_metrics(self, records: Sequence[Any], weight_key: str) -> Any:
        """``evaluate_metrics_aggr_fn``: note each site's evaluation metrics, return the weighted mean."""
        return self._note("evaluate", records, weight_key)

    def end_round(self, server_round: int, *_: Any) -> None:
        """``post_round_fn``: file the round's metrics, write the JSON and the plot."""
        self.rounds[server_round] = self._pending
        self._pending = {}
        self.write()

    def write(self) -> None:
        """Write ``flwr_history.json`` and ``flwr_progress.png``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"rounds": {str(r): self.rounds[r] for r in sorted(self.rounds)}}, indent=1)
        temporary = self.json_file.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.replace(self.json_file)
        self.plot()

    def series(self, stage: str, metric: str) -> dict[str, tuple[list[int], list[float]]]:
        """``{"aggregated" | site name: (rounds, values)}`` of one metric."""
        lines: dict[str, tuple[list[int], list[float]]] = {}
        for server_round in sorted(self.rounds):
            entry = self.rounds[server_round].get(stage, {})
            values = {"aggregated": entry.get("aggregated", {}), **entry.get("sites", {})}
            for name, metrics in values.items():
                if isinstance(metrics.get(metric), (int, float)):
                    rounds, points = lines.setdefault(name, ([], []))
                    rounds.append(server_round)
                    points.append(float(metrics[metric]))
        return lines

    def plot(self) -> None:
        """Dice (evaluation and training pseudo-Dice) and training loss per round, aggregated and per site."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        dice = self.series("evaluate", "dice")
        pseudo = self.series("train", "pseudo-dice")
        loss = self.series("train", "train-loss")
        names = ["aggregated", *sorted({*dice, *pseudo, *loss} - {"aggregated"})]
        colors = {name: f"C{index % 10}" for index, name in enumerate(names)}
        width = {name: 3.0 if name == "aggregated" else 1.5 for name in names}
        figure, (dice_axis, loss_axis) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
        for name, (rounds, values) in dice.items():
            dice_axis.plot(rounds, values, "o-", color=colors[name], lw=width[name], label=f"{name} Dice")
        for name, (rounds, values) in pseudo.items():
            dice_axis.plot(rounds, values, ":", color=colors[name], lw=width[name], label=f"{name} pseudo-Dice")
        for name, (rounds, values) in loss.items():
            loss_axis.plot(rounds, values, "o-", color=colors[name], lw=width[name], label=name)
        dice_axis.set_ylabel("Dice (validation: solid; training pseudo-Dice: dotted)")
        loss_axis.set_ylabel("training loss")
        loss_axis.set_xlabel("round")
        loss_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        for axis in (dice_axis, loss_axis):
            axis.grid(alpha=0.3)
            if axis.lines:
                axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(self.plot_file)
        plt.close(figure)


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
