"""The run config's one schema: every ``[tool.flwr.app.config]`` key, its type, default and meaning.

pyproject.toml, :class:`RunSettings`, the client's defaults and the table of
documentation/run-config.md all follow :data:`RUN_CONFIG` (the tests check
pyproject.toml and that page against it; :func:`markdown_table` renders the table).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr_nnunet.core.quantize import SCHEMES

__all__ = [
    "RUN_CONFIG",
    "RUN_CONFIG_KEYS",
    "RunSettings",
    "Setting",
    "data_root",
    "default_data_root",
    "markdown_table",
    "parse_options",
    "run_config_value",
]

Value = bool | int | float | str


@dataclass(frozen=True)
class Setting:
    """One run-config key: its TOML type, its default (as in pyproject.toml) and what it means."""

    key: str
    type: type
    default: Value
    meaning: str

    def read(self, run_config: Mapping[str, Any]) -> Value:
        """This key's value in ``run_config`` (the default when missing), as :attr:`type`.

        Strings of the right form are converted (``'3'`` for an int, ``'true'`` for a bool, ``1`` for a string).

        Raises
        ------
        ValueError
            If the value is not of the key's type and does not convert to it.
        """
        value = run_config.get(self.key, self.default)
        if type(value) is self.type:
            return value
        text = str(value).strip()
        if self.type is bool and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if self.type is not bool and not isinstance(value, bool):
            with contextlib.suppress(ValueError):
                return self.type(text)
        raise ValueError(
            f"run-config {self.key!r} must be {self.type.__name__} (default {_toml(self.default)}), got {value!r}"
        )


def _toml(value: Value) -> str:
    return json.dumps(value)


RUN_CONFIG: tuple[Setting, ...] = (
    Setting("num-server-rounds", int, 8, "federated rounds (the run's total; a resumed run continues to it)"),
    Setting("local-epochs", int, 1, "nnU-Net epochs each site trains per round"),
    Setting("iterations-per-epoch", int, 40, "training batches per epoch (0: the trainer's own, 250)"),
    Setting("val-iterations-per-epoch", int, 5, "pseudo-Dice batches per epoch (0: the trainer's own, 50)"),
    Setting(
        "strategy",
        str,
        "fedavg",
        "fedavg, fedavgm, fedprox, fedadagrad, fedadam, fedyogi, fedmedian, fedtrimmedavg, krum, multikrum, "
        "bulyan, qfedavg",
    ),
    Setting(
        "strategy-options",
        str,
        "",
        "extra strategy arguments, 'name=value' separated by spaces (e.g. 'eta=0.01 beta_1=0.9')",
    ),
    Setting(
        "proximal-mu",
        float,
        0.0,
        "FedProx coefficient mu (> 0 adds mu/2 times the squared distance to the global weights to every site's "
        "loss, with any strategy)",
    ),
    Setting(
        "dp",
        str,
        "",
        "differential privacy wrapper: '', server-fixed, server-adaptive, client-fixed, client-adaptive "
        "(client-* clip on the sites, via the ClientApp's mod)",
    ),
    Setting(
        "dp-options",
        str,
        "",
        "DP wrapper arguments, 'name=value' separated by spaces "
        "(e.g. 'noise_multiplier=1.0 clipping_norm=10 num_sampled_clients=3')",
    ),
    Setting(
        "compression",
        str,
        "none",
        f"update compression, both directions: {', '.join(['none', *SCHEMES])} (lossy modes send deltas with "
        "error feedback; see documentation/compression.md)",
    ),
    Setting("fraction-train", float, 1.0, "fraction of connected nodes sampled for training each round"),
    Setting("fraction-evaluate", float, 1.0, "fraction of connected nodes sampled for evaluation each round"),
    Setting("min-train-nodes", int, 2, "minimum nodes per training round"),
    Setting("min-evaluate-nodes", int, 2, "minimum nodes per evaluation round"),
    Setting(
        "min-available-nodes",
        int,
        2,
        "nodes to wait for before a round starts; federated planning goes on without lost sites while this many answer",
    ),
    Setting(
        "node-wait",
        float,
        600.0,
        "seconds a round's sampling waits for min-available-nodes; then it goes on with the connected nodes if "
        "they meet min-train-nodes / min-evaluate-nodes, else the run stops with its checkpoints intact "
        "(< 0: wait without end, Flower's own behaviour)",
    ),
    Setting(
        "dataset",
        str,
        "Dataset987_FedDemo",
        "the federation's nnU-Net dataset, Dataset<ID>_<Name>: the server's plans and global model folder (a site "
        "may hold it under its own name, e.g. Dataset517_Liver: node-config 'dataset', or its folder in simulation)",
    ),
    Setting("configuration", str, "2d", "nnU-Net configuration (2d, 3d_fullres, ...)"),
    Setting("plans", str, "nnUNetPlans", "plans identifier"),
    Setting(
        "layer-matching",
        str,
        "",
        "'': every site trains the federation's plans; role: a site may keep its own plans (node-config 'plans', "
        "a copy of them in the server's dataset folder) and layers are averaged where they match by role across "
        "plans, one global model folder per plans (planning='fixed'; see documentation/hospitals-that-differ.md)",
    ),
    Setting(
        "local-norms",
        bool,
        False,
        "each site keeps its own normalization layers (FedBN: their scale and shift are neither sent nor averaged), "
        "for sites whose scanners differ",
    ),
    Setting(
        "labels",
        str,
        "",
        "partial labels: the federation's label set, 'name=value' separated by spaces ('background=0 organ=1 "
        "lesion=2'); a site may then annotate a subset (its dataset.json's labels) and trains with the marginal "
        "loss ('': every site must declare the same labels)",
    ),
    Setting(
        "planning",
        str,
        "federated",
        "federated: before round 1 every site sends aggregate statistics of its raw data (query messages, no "
        "image), the server plans with nnU-Net and every site preprocesses (resume=true: the plans of the run "
        "resumed, not planned again); fixed: train with the plans in <data-root>/server/nnUNet_preprocessed/"
        "<dataset> (an earlier run's, a pretrained model's), every site preprocessed with them",
    ),
    Setting(
        "planner",
        str,
        "default",
        "federated planning's nnU-Net planner: default (plans nnUNetPlans), resenc-m, resenc-l, resenc-xl "
        "(plans nnUNetResEncUNetMPlans, ...LPlans, ...XLPlans: set plans to match)",
    ),
    Setting(
        "plans-max-features",
        int,
        0,
        "federated planning: cap every stage's width (0: nnU-Net's widths; make-demo=true plans the demo's: 32)",
    ),
    Setting(
        "plans-width-divisor",
        int,
        1,
        "federated planning: divide every stage's width first (1: nnU-Net's widths; make-demo=true: the demo's 4)",
    ),
    Setting(
        "trainer",
        str,
        "nnUNetTrainer",
        "nnU-Net trainer class (nnUNetTrainer, nnUNetTrainerBN, nnUNetTrainerNoDeepSupervision, ...; others via "
        "nnUNet_extTrainer)",
    ),
    Setting(
        "fold",
        str,
        "0",
        "split of each site's splits_final.json: train on 'train', evaluate on 'val' ('all': both on every case; "
        "node-config 'fold' overrides it)",
    ),
    Setting(
        "data-root",
        str,
        "",
        "folder with server/ and site-K/ nnU-Net roots ('': $FLWR_HOME/flwr-nnunet-demo, or -demo-3d)",
    ),
    Setting("results-dir", str, "", "nnUNet_results of the global model ('': <data-root>/server/nnUNet_results)"),
    Setting(
        "make-demo",
        bool,
        True,
        "make the synthetic demo under data-root if it is not there (each site's raw data; the run plans it)",
    ),
    Setting(
        "demo-3d",
        bool,
        False,
        "make the demo with small 3D volumes (then set configuration='3d_fullres'; see configs/demo-3d.toml)",
    ),
    Setting("demo-sites", int, 3, "number of demo sites (2 or 3; up to 4 in 2D)"),
    Setting("resume", bool, False, "continue a killed run from the model folder's last checkpoint"),
    Setting("seed", int, 0, "seeds the global model's initialisation and every site's round"),
    Setting(
        "device",
        str,
        "auto",
        "where the sites train: auto (CUDA when present), cpu or cuda (node-config 'device' overrides it)",
    ),
    Setting("round-timeout", float, 3600.0, "seconds to wait for replies each round"),
    Setting(
        "streaming",
        bool,
        False,
        "fold each training reply into the global model as it arrives: server memory flat in the number of sites "
        "(the weighted means and DP fixed clipping stream; order statistics, Krum, QFedAvg and adaptive clipping "
        "keep the batch path)",
    ),
    Setting(
        "quorum",
        float,
        1.0,
        "with streaming: a training round closes 'grace' seconds after this fraction of the sampled nodes replied "
        "(1.0: all of them, or round-timeout)",
    ),
    Setting("grace", float, 0.0, "with streaming: seconds a round stays open for late replies once the quorum is in"),
    Setting(
        "packed-arrays",
        bool,
        True,
        "each message's arrays travel packed, as one Array and its layout (a few transport objects instead of two "
        "per tensor); false: one Array per canonical tensor, for a ClientApp of your own that does not unpack",
    ),
    Setting(
        "flagged-weight",
        float,
        1.0,
        "what a site flagged as disagreeing with the federation (its labels fit the global model only re-matched, "
        "or its update points against the others', 2 rounds in a row; always logged) counts for from then on: 1 as "
        "any site, 0 < w < 1 its weight times w, 0 excluded from training (still evaluated)",
    ),
    Setting(
        "personalization",
        str,
        "",
        "'': one global model; mr-mtl: every site trains its own personal model, pulled towards the global one "
        "(mean of the personal models) by personal-mu, evaluated beside it and written at the site as "
        "fold_<fold>/checkpoint_personal.pth",
    ),
    Setting("personal-mu", float, 0.1, "mr-mtl: weight mu of mu/2 ||w_personal - w_global||^2 (0: local training)"),
    Setting(
        "fine-tune-epochs",
        int,
        0,
        "after the last round, each site fine-tunes the global model for this many epochs and keeps it as its "
        "personal model (checkpoint_personal.pth) only where its validation Dice is higher (0: no fine-tuning)",
    ),
    Setting(
        "crossval",
        bool,
        False,
        "a cross-validation run of fold 'fold' (0, 1, ...): the global model goes to fold_<fold>/ (not fold_all/), "
        "after the last round every site validates it on its fold's validation cases and sends per-case counts "
        "only; fold_<fold>/validation/ gets the summaries, and once folds 0-4 are done "
        "crossval_results_folds_0_1_2_3_4/ the merged ones and postprocessing.pkl (documentation/pipeline.md)",
    ),
    Setting(
        "find-best-configuration",
        str,
        "",
        "a model selection run instead of training: the configurations to compare, e.g. '2d 3d_fullres', each "
        "cross-validated already (crossval=true, folds 0-4); every site ensembles each pair on its own cases and "
        "sends counts only; the best by the federation's foreground Dice, its postprocessing and "
        "inference_instructions.txt are written as nnUNetv2_find_best_configuration writes them",
    ),
    Setting(
        "cross-site-evaluation",
        str,
        "",
        "after the last round, a matrix of models x sites (cross_site_evaluation.json): 'global' scores the final "
        "global model at every site; 'local-models' also each site's model after its last round at every other "
        "site (an opt-in: it shares the sites' models); '' (off)",
    ),
)
"""Every run-config key, in pyproject.toml's order."""

_SETTINGS = {setting.key: setting for setting in RUN_CONFIG}

RUN_CONFIG_KEYS: dict[str, str] = {setting.key: setting.meaning for setting in RUN_CONFIG}
"""Every ``[tool.flwr.app.config]`` key this app reads, with its meaning."""


def run_config_value(run_config: Mapping[str, Any], key: str) -> Value:
    """``run_config[key]`` checked and typed by the schema, or the schema's default (see :meth:`Setting.read`)."""
    return _SETTINGS[key].read(run_config)


def markdown_table() -> str:
    """The run-config table of documentation/run-config.md: ``| key | default | meaning |``, one row per key."""
    rows = [f"| `{s.key}` | `{_toml(s.default)}` | {s.meaning} |" for s in RUN_CONFIG]
    return "\n".join(["| key | default | meaning |", "|---|---|---|", *rows]) + "\n"


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
        options[name.strip()] = _option(value.strip())
    return options


def _option(text: str) -> Value:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def default_data_root(run_config: Mapping[str, Any]) -> Path:
    """Where the demo lives when run-config ``data-root`` is empty: ``$FLWR_HOME/flwr-nnunet-demo`` (``-3d``)."""
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")).expanduser()
    return home / ("flwr-nnunet-demo-3d" if run_config_value(run_config, "demo-3d") else "flwr-nnunet-demo")


def data_root(run_config: Mapping[str, Any]) -> Path:
    """Run-config ``data-root`` (folders ``server/`` and ``site-K/``), absolute."""
    value = str(run_config_value(run_config, "data-root"))
    return (Path(value).expanduser() if value else default_data_root(run_config)).absolute()


@dataclass(frozen=True)
class RunSettings:
    """The run config, typed; build it with :meth:`from_run_config` (``from_run_config({})``: the defaults).

    One attribute per key of :data:`RUN_CONFIG` (``num-server-rounds`` is
    ``num_rounds``, ``-`` becomes ``_``); the option strings are parsed into
    dicts and ``data-root`` / ``results-dir`` resolved into absolute paths.
    """

    num_rounds: int
    local_epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int
    strategy: str
    strategy_options: dict[str, Any]
    proximal_mu: float
    dp: str
    dp_options: dict[str, Any]
    compression: str
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    node_wait: float
    dataset: str
    configuration: str
    plans: str
    layer_matching: str
    local_norms: bool
    labels: dict[str, Any]
    planning: str
    planner: str
    plans_max_features: int
    plans_width_divisor: int
    trainer: str
    fold: str
    data_root: Path
    results_dir: Path
    make_demo: bool
    demo_3d: bool
    demo_sites: int
    resume: bool
    seed: int
    device: str
    round_timeout: float
    streaming: bool
    packed_arrays: bool
    quorum: float
    grace: float
    flagged_weight: float
    personalization: str
    personal_mu: float
    fine_tune_epochs: int
    crossval: bool
    find_best_configuration: str
    cross_site_evaluation: str

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Typed settings from ``context.run_config`` (missing keys take the schema's defaults).

        Raises
        ------
        ValueError
            For a value of the wrong type (naming the key and its type) or a malformed option string.
        """
        values: dict[str, Any] = {
            "num_rounds" if s.key == "num-server-rounds" else s.key.replace("-", "_"): s.read(config)
            for s in RUN_CONFIG
        }
        values["strategy_options"] = parse_options(values["strategy_options"])
        values["dp_options"] = parse_options(values["dp_options"])
        values["labels"] = parse_options(values["labels"])
        root = values["data_root"] = data_root(config)
        results = values["results_dir"]
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
        if self.personalization == "mr-mtl":
            config["mr-mtl-mu"] = self.personal_mu
        return config
