"""A run's history: per-round aggregated and per-site metrics, as JSON and as a progress plot.

:class:`RunHistory` files what the strategy's metric aggregation sees each
round and writes ``flwr_history.json`` (atomically) and ``flwr_progress.png``
into the model folder after every round.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr_nnunet.nnunet.checkpoint_io import atomic_write

__all__ = ["HISTORY_FILE", "PROGRESS_FILE", "RunHistory", "class_names"]

HISTORY_FILE = "flwr_history.json"
PROGRESS_FILE = "flwr_progress.png"


def class_names(dataset_json: Mapping[str, Any]) -> list[str]:
    """The names of the foreground labels, or of the regions, in the order of the sites' ``dice-per-class``.

    That order is nnU-Net's label manager's: ``foreground_labels`` by value, or ``foreground_regions`` in
    ``dataset.json``'s order for a region-based dataset.
    """
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    labels = dataset_json["labels"]
    manager = LabelManager(labels, dataset_json.get("regions_class_order"))
    if manager.has_regions:
        by_region = {tuple(v) if isinstance(v, list) else v: name for name, v in labels.items()}
        return [by_region[region] for region in manager.foreground_regions]
    by_value = {int(v[0] if isinstance(v, list) else v): name for name, v in labels.items()}
    return [by_value[label] for label in manager.foreground_labels]


class RunHistory:
    """Per-round aggregated and per-site metrics, written as JSON and plotted after every round.

    Its :meth:`train_metrics` / :meth:`evaluate_metrics` are the strategy's
    metric aggregation functions: they note each site's metrics (the site name
    travels in the reply's ``config`` record) and return Flower's weighted mean.

    Parameters
    ----------
    folder
        Where ``flwr_history.json`` and ``flwr_progress.png`` go (the model folder).
    dataset, configuration, strategy
        Named in the plot's title (with the sites that replied).
    """

    def __init__(self, folder: str | Path, *, dataset: str = "", configuration: str = "", strategy: str = ""):
        self.folder = Path(folder)
        self.dataset = dataset
        self.configuration = configuration
        self.strategy = strategy
        self.rounds: dict[int, dict[str, Any]] = {}
        self.fine_tune: dict[str, Any] = {}
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
            about = json.loads(self.json_file.read_text())
            self.rounds = {int(r): v for r, v in about["rounds"].items()}
            self.fine_tune = about.get("fine-tune", {})

    @staticmethod
    def _entry(records: Sequence[Any], weight_key: str) -> tuple[Any, dict[str, Any]]:
        """The weighted mean of the records (:func:`~flwr_nnunet.strategy.aggregation.aggregate_site_metrics`) and
        ``{"aggregated", "sites"}`` for the history."""
        from flwr_nnunet.strategy.aggregation import aggregate_site_metrics

        sites = {}
        for index, record in enumerate(records):
            about = record.config_records.get("config")
            name = str(about.get("site-name", f"reply-{index}")) if about is not None else f"reply-{index}"
            sites[name] = {k: v for metrics in record.metric_records.values() for k, v in metrics.items()}
        aggregated = aggregate_site_metrics(list(records), weight_key)
        return aggregated, {"aggregated": dict(aggregated), "sites": sites}

    def _note(self, stage: str, records: Sequence[Any], weight_key: str) -> Any:
        aggregated, self._pending[stage] = self._entry(records, weight_key)
        return aggregated

    def train_metrics(self, records: Sequence[Any], weight_key: str) -> Any:
        """``train_metrics_aggr_fn``: note each site's training metrics, return the weighted mean."""
        return self._note("train", records, weight_key)

    def evaluate_metrics(self, records: Sequence[Any], weight_key: str) -> Any:
        """``evaluate_metrics_aggr_fn``: note each site's evaluation metrics, return the weighted mean."""
        return self._note("evaluate", records, weight_key)

    def note_fine_tune(self, records: Sequence[Any], weight_key: str) -> None:
        """File the sites' fine-tuning metrics (``fine-tune`` in the JSON) and write the history."""
        if records:
            _, self.fine_tune = self._entry(records, weight_key)
            self.write()

    def end_round(self, server_round: int, *, diagnostics: Mapping[str, Any] | None = None) -> None:
        """File the round's metrics (and ``diagnostics``: what the strategy's site diagnostics measured), write
        the JSON and the plot."""
        if diagnostics is not None:
            self._pending["diagnostics"] = dict(diagnostics)
        self.rounds[server_round] = self._pending
        self._pending = {}
        self.write()

    def class_names(self) -> list[str]:
        """:func:`class_names` of the model folder's ``dataset.json`` (none before it is written)."""
        path = self.folder / "dataset.json"
        return class_names(json.loads(path.read_text())) if path.is_file() else []

    def write(self) -> None:
        """Write ``flwr_history.json`` (with ``class-names``: what each ``dice-per-class`` entry scores) and the plot."""
        self.folder.mkdir(parents=True, exist_ok=True)
        about = {"class-names": self.class_names(), "rounds": {str(r): self.rounds[r] for r in sorted(self.rounds)}}
        if self.fine_tune:
            about["fine-tune"] = self.fine_tune
        text = json.dumps(about, indent=1)
        atomic_write(self.json_file, lambda file: file.write(text.encode()))
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

    def aggregated_per_class(self) -> dict[str, tuple[list[int], list[float]]]:
        """``{class name: (rounds, values)}`` of the aggregated ``dice-per-class`` (names from :meth:`class_names`)."""
        names = self.class_names()
        lines: dict[str, tuple[list[int], list[float]]] = {}
        for server_round in sorted(self.rounds):
            values = self.rounds[server_round].get("evaluate", {}).get("aggregated", {}).get("dice-per-class")
            if isinstance(values, list) and len(values) == len(names):
                for name, value in zip(names, values):
                    rounds, points = lines.setdefault(name, ([], []))
                    rounds.append(server_round)
                    points.append(float(value))
        return lines

    def validation_cases(self) -> dict[str, int]:
        """Validation cases per site (the ``num-examples`` of its last evaluate reply) and their sum as ``aggregated``."""
        cases: dict[str, int] = {}
        for server_round in sorted(self.rounds):
            for name, metrics in self.rounds[server_round].get("evaluate", {}).get("sites", {}).items():
                if isinstance(metrics.get("num-examples"), (int, float)):
                    cases[name] = int(metrics["num-examples"])
        if cases:
            cases["aggregated"] = sum(cases.values())
        return cases

    def title(self) -> str:
        """The plot's title: dataset, configuration, strategy and the sites that replied."""
        sites = sorted(
            {name for entry in self.rounds.values() for stage in entry.values() for name in stage.get("sites", {})}
        )
        about = [part for part in (self.dataset, self.configuration) if part]
        if self.strategy:
            about.append(f"strategy {self.strategy}")
        return ", ".join(about) + f"\n{len(sites)} site(s): {', '.join(sites) or 'none yet'}"

    def figure(self) -> Any:
        """The progress figure (matplotlib, Agg): Dice per round above, training loss below, legends to the right."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        dice = self.series("evaluate", "dice")
        personal = self.series("evaluate", "personal-dice")
        pseudo = self.series("train", "pseudo-dice")
        loss = self.series("train", "train-loss")
        cases = self.validation_cases()
        names = ["aggregated", *sorted({*dice, *personal, *pseudo, *loss} - {"aggregated"})]
        colors = {name: f"C{index % 10}" for index, name in enumerate(names)}
        width = {name: 3.0 if name == "aggregated" else 1.5 for name in names}
        figure, (dice_axis, loss_axis) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
        for name, (rounds, values) in dice.items():
            count = f" ({cases[name]} validation case{'s' if cases[name] != 1 else ''})" if name in cases else ""
            label = f"{name} Dice{count}"
            dice_axis.plot(rounds, values, "o-", color=colors[name], lw=width[name], label=label)
        for name, (rounds, values) in personal.items():
            dice_axis.plot(
                rounds, values, "^-.", color=colors[name], lw=width[name], label=f"{name} personal model Dice"
            )
        for name, (rounds, values) in pseudo.items():
            dice_axis.plot(rounds, values, ":", color=colors[name], lw=width[name], label=f"{name} pseudo-Dice")
        for index, (name, (rounds, values)) in enumerate(self.aggregated_per_class().items()):
            color = f"C{(len(names) + index) % 10}"
            dice_axis.plot(rounds, values, "s--", color=color, lw=1.0, label=f"aggregated Dice of {name}")
        for name, (rounds, values) in loss.items():
            loss_axis.plot(rounds, values, "o-", color=colors[name], lw=width[name], label=name)
        dice_axis.set_ylabel(
            "Dice of the global model on each site's validation\n"
            "cases (solid; per label or region: dashed; personal\nmodels: dash-dot);\ntraining pseudo-Dice (dotted)"
        )
        loss_axis.set_ylabel(
            "training loss: nnU-Net's Dice + CE\n= cross-entropy - soft Dice (below 0 once\nDice > CE; lower is better)"
        )
        loss_axis.set_xlabel("round")
        loss_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        for axis in (dice_axis, loss_axis):
            axis.grid(alpha=0.3)
            if axis.lines:
                axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        figure.suptitle(self.title())
        figure.tight_layout()
        return figure

    def plot(self) -> None:
        """Write :meth:`figure` to ``flwr_progress.png`` (legends outside the curves, so the image is as wide as needed)."""
        import matplotlib.pyplot as plt

        figure = self.figure()
        figure.savefig(self.plot_file, bbox_inches="tight")
        plt.close(figure)
