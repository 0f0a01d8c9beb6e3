"""A site's answers to the planning phase (Flower ``query`` messages): statistics out, plans in.

The server (:mod:`flwr_nnunet.apps.planning_phase`) asks each site three
times; the instruction's ``config`` record names the stage
(``planning-stage``), the reply's ``config`` carries ``site-name`` and the
answer as JSON text under ``planning``:

``survey``
    :func:`~flwr_nnunet.nnunet.fingerprint.site_survey`: dataset.json fields,
    reader/writer, number of cases, foreground min/max per channel, voxels
    per label value over the training cases (``label_voxels``).
``statistics``
    :func:`~flwr_nnunet.nnunet.fingerprint.site_statistics` with the bins and
    per-case sample count the server sends: per-case shapes, spacings and
    relative sizes after cropping; per channel count, sum, sum of squared
    deviations, min, max and a fixed-bin histogram.
``plans``
    The federation's plans, ``dataset.json`` and merged fingerprint are
    installed into the site's preprocessed folder and the site's training
    cases preprocessed with nnU-Net's preprocessor (skipped when they already
    are, with plans of the same digest); the answer is the plans digest.

A run with ``layer-matching = "role"`` plans nothing but asks each site once which plans it trains
(:data:`SITE_PLANS_STAGE`, :func:`answer_site_plans`): their name and digest.

Nothing per voxel and no image is ever in a reply. This module is the site's
side but knows nothing of :mod:`flwr_nnunet.apps.client` (which routes the
message here with the site's folders).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr_nnunet.apps.run_config import data_root
from flwr_nnunet.errors import FlwrNnUNetError

__all__ = [
    "PLANNING_STAGES",
    "SITE_PLANS_STAGE",
    "PlanningQueryError",
    "answer_planning",
    "answer_site_plans",
    "preprocessed_with",
    "raw_dataset_folder",
]

PLANNING_STAGES = ("survey", "statistics", "plans")
"""The planning queries, in the order the server sends them."""

SITE_PLANS_STAGE = "site-plans"
"""The query of a ``layer-matching = "role"`` run: which plans the site trains (answered by :func:`answer_site_plans`)."""

_MARKER = "flwr_preprocessed.json"


class PlanningQueryError(FlwrNnUNetError, ValueError):
    """A planning query this site cannot answer (malformed, or the site's data are missing)."""


def raw_dataset_folder(run_config: Mapping[str, Any], node_config: Mapping[str, Any], dataset: str) -> Path:
    """The site's raw dataset: ``<data-root>/site-K/nnUNet_raw/<dataset>`` in simulation.

    In deployment the node config's ``nnunet-raw`` (else the ``nnUNet_raw``
    variable) is the site's nnUNet_raw root. ``dataset`` is the site's own
    dataset folder name (:attr:`~flwr_nnunet.site.spec.SiteSpec.dataset`),
    which may differ from the federation's.

    Raises
    ------
    PlanningQueryError
        If a deployed node names no raw root.
    """
    if "partition-id" in node_config:
        return data_root(run_config) / f"site-{int(node_config['partition-id'])}" / "nnUNet_raw" / dataset
    root = node_config.get("nnunet-raw") or os.environ.get("nnUNet_raw")
    if not root:
        raise PlanningQueryError(
            "federated planning needs the site's raw data: start the SuperNode with --node-config "
            "\"nnunet-raw='<nnUNet_raw folder>' ...\" (or set nnUNet_raw)"
        )
    return Path(str(root)).expanduser().absolute() / dataset


def _json(config: Mapping[str, Any], key: str) -> Any:
    value = config.get(key)
    if not isinstance(value, str):
        raise PlanningQueryError(f"the planning query has no text {key!r} (found {type(value).__name__})")
    try:
        return json.loads(value)
    except ValueError as error:
        raise PlanningQueryError(f"the planning query's {key!r} is not JSON ({error})") from None


def preprocessed_with(preprocessed_dataset_folder: Path, plans: dict, configuration: str, cases: list[str]) -> bool:
    """Whether the site's cases are already preprocessed with exactly these plans and configuration.

    True when the folder holds the plans file with the same digest
    (:func:`~flwr_nnunet.nnunet.digests.plans_sha256`) and a preprocessed
    ``<case>.pkl`` for every training case in the configuration's data folder.
    """
    from flwr_nnunet.nnunet.digests import plans_sha256

    plans_file = preprocessed_dataset_folder / f"{plans['plans_name']}.json"
    if not plans_file.is_file():
        return False
    try:
        installed = json.loads(plans_file.read_text())
    except ValueError:
        return False
    if plans_sha256(installed) != plans_sha256(plans):
        return False
    data = preprocessed_dataset_folder / plans["configurations"][configuration].get(
        "data_identifier", f"{plans['plans_name']}_{configuration}"
    )
    return all((data / f"{case}.pkl").is_file() for case in cases)


def _write_splits(folder: Path, cases: list[str]) -> None:
    """``splits_final.json`` when the site has none: nnU-Net's 5-fold split, or one split under 5 cases."""
    path = folder / "splits_final.json"
    if path.is_file():
        return
    if len(cases) >= 5:
        from nnunetv2.utilities.crossval_split import generate_crossval_split

        splits = generate_crossval_split(sorted(cases), seed=12345, n_splits=5)
    else:
        validation = sorted(cases)[-max(1, len(cases) // 4) :]
        splits = [{"train": [c for c in sorted(cases) if c not in validation], "val": validation}]
    path.write_text(json.dumps(splits, indent=4))


def _install_and_preprocess(config: Mapping[str, Any], raw: Path, preprocessed: Path) -> dict:
    from flwr_nnunet.nnunet.digests import plans_sha256
    from flwr_nnunet.nnunet.fingerprint import training_cases
    from flwr_nnunet.nnunet.label_sets import DRAWN_AS_KEY, UNANNOTATED_DRAWN_AS, site_drawn_as
    from flwr_nnunet.nnunet.planning import install_plans, preprocess_site

    plans, dataset_json = _json(config, "plans"), _json(config, "dataset-json")
    fingerprint = _json(config, "fingerprint")
    configuration = config.get("configuration")
    if not isinstance(configuration, str) or configuration not in plans.get("configurations", {}):
        raise PlanningQueryError(f"the plans have no configuration {configuration!r}")
    site_json, cases = training_cases(raw)
    own = {name: value for name, value in site_json["labels"].items()}
    site_json = {**site_json, **{k: dataset_json[k] for k in ("channel_names", "labels", "file_ending")}}
    if set(own) != set(dataset_json["labels"]):  # partial labels: what this site drew each label as
        site_json[DRAWN_AS_KEY] = site_drawn_as(own, site_json.get(UNANNOTATED_DRAWN_AS) or {}, dataset_json["labels"])
    identifiers = sorted(cases)
    done = preprocessed_with(preprocessed, plans, configuration, identifiers)
    if not done:
        install_plans(plans, site_json, preprocessed, fingerprint)
        preprocess_site(raw, preprocessed, plans, configuration)
        (preprocessed / _MARKER).write_text(
            json.dumps({"plans-sha256": plans_sha256(plans), "configuration": configuration, "cases": identifiers})
        )
    _write_splits(preprocessed, identifiers)
    return {"plans-sha256": plans_sha256(plans), "preprocessed": not done, "num_cases": len(identifiers)}


def answer_planning(config: Mapping[str, Any], raw: Path, preprocessed: Path) -> tuple[str, dict]:
    """The site's answer to one planning query (its ``config`` record): ``(stage, answer)``.

    Parameters
    ----------
    config
        The query's ``ConfigRecord``: ``planning-stage`` and that stage's inputs.
    raw, preprocessed
        The site's ``<nnUNet_raw>/<dataset>`` and ``<nnUNet_preprocessed>/<dataset>``.

    Raises
    ------
    PlanningQueryError
        For an unknown stage or a malformed input.
    FileNotFoundError
        If the site has no raw dataset there.
    """
    from flwr_nnunet.nnunet.fingerprint import site_statistics, site_survey

    stage = config.get("planning-stage")
    if stage not in PLANNING_STAGES:
        raise PlanningQueryError(f"unknown planning-stage {stage!r}; expected one of {', '.join(PLANNING_STAGES)}")
    if stage == "survey":
        return stage, site_survey(raw)
    if stage == "statistics":
        samples = config.get("samples-per-case")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise PlanningQueryError(f"config 'samples-per-case' must be an integer >= 1, not {samples!r}")
        return stage, site_statistics(raw, _json(config, "bins"), samples)
    return stage, _install_and_preprocess(config, raw, preprocessed)


def answer_site_plans(site: Any) -> dict:
    """The site's answer to :data:`SITE_PLANS_STAGE`: ``{"plans": <name>, "plans-sha256": <digest>}`` of the plans it
    trains (its spec's, node-config ``plans`` or run-config ``plans``), after the site's checks
    (:meth:`~flwr_nnunet.site.site.Site.check`: the plans there, the data preprocessed with them).

    Raises
    ------
    SiteError
        Naming what the site lacks and the fix.
    """
    from flwr_nnunet.nnunet.digests import plans_sha256

    return {"plans": site.spec.plans, "plans-sha256": plans_sha256(site.check())}
