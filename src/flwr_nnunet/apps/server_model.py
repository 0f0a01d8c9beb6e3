"""The server's global model: the federation's plans files, the network built from them, its nnU-Net model folder.

Read by :func:`flwr_nnunet.apps.server.build_strategy` (one global model) and
:func:`flwr_nnunet.apps.own_plans.build_role_strategy` (one per plans the server holds).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from flwr_nnunet.apps.config_errors import ServerConfigError, read_required_json
from flwr_nnunet.apps.run_config import RunSettings
from flwr_nnunet.nnunet.networks import build_trainer_network, is_normalization_key

__all__ = ["global_model_folder", "global_network", "round_options", "server_files", "strategy_options_named"]


def server_files(settings: RunSettings) -> tuple[dict, dict, dict]:
    """The federation's plans (run-config ``plans``), dataset.json and fingerprint in the server's dataset folder.

    Raises
    ------
    ServerConfigError
        If one is missing or the plans lack the run's configuration, naming the fix.
    """
    folder = settings.server_dataset_folder
    fix = (
        f"check run-config dataset ({settings.dataset!r}), plans ({settings.plans!r}) and data-root "
        f"({settings.data_root}); planning='fixed' needs the federation's plans, dataset.json and "
        "dataset_fingerprint.json there, planning='federated' plans from the sites' raw data before round 1"
    )
    if not folder.is_dir():
        raise ServerConfigError(f"no dataset {settings.dataset!r} on the server: {folder} does not exist; {fix}")
    plans = read_required_json(folder / f"{settings.plans}.json", fix)
    dataset_json = read_required_json(folder / "dataset.json", fix)
    fingerprint = read_required_json(folder / "dataset_fingerprint.json", fix)
    configurations = sorted(plans.get("configurations", {}))
    if settings.configuration not in configurations:
        raise ServerConfigError(
            f"the plans {folder / settings.plans}.json have no configuration {settings.configuration!r} (they have "
            f"{', '.join(configurations) or 'none'}): set run-config configuration to one of them"
            + (" (the 3D demo: demo-3d=true)" if settings.make_demo and not settings.demo_3d else "")
        )
    return plans, dataset_json, fingerprint


def global_network(settings: RunSettings, plans: dict, dataset_json: dict) -> torch.nn.Module:
    """The network run-config ``trainer`` builds from ``plans``, initialised from run-config ``seed``."""
    torch.manual_seed(settings.seed)
    return build_trainer_network(plans, dataset_json, settings.configuration, settings.trainer)


def global_model_folder(settings: RunSettings, plans: dict, dataset_json: dict, fingerprint: dict) -> Any:
    """The nnU-Net model folder of ``plans``' global model under run-config ``results-dir``."""
    from flwr_nnunet.nnunet.model_folder import NnUNetModelFolder

    dims = len(plans["configurations"][settings.configuration]["patch_size"])
    return NnUNetModelFolder.in_results(
        settings.results_dir,
        plans,
        dataset_json,
        fingerprint,
        settings.configuration,
        trainer_name=settings.trainer,
        inference_allowed_mirroring_axes=tuple(range(dims)),
        fold=settings.fold if settings.crossval else "all",  # a cross-validation fold's model: fold_<k>/
    )


def round_options(settings: RunSettings) -> dict[str, Any]:
    """The strategy arguments every round reads from the run config: node sampling, the flagged sites' weight and
    what each site keeps (``local-norms``)."""
    return {
        "local_keys": is_normalization_key if settings.local_norms else None,
        "fraction_train": settings.fraction_train,
        "fraction_evaluate": settings.fraction_evaluate,
        "min_train_nodes": settings.min_train_nodes,
        "min_evaluate_nodes": settings.min_evaluate_nodes,
        "min_available_nodes": settings.min_available_nodes,
        "flagged_weight": settings.flagged_weight,
    }


@contextmanager
def strategy_options_named(settings: RunSettings) -> Iterator[None]:
    """Around building the strategy: an argument it does not take (run-config ``strategy-options`` /
    ``dp-options``) reported as a :class:`ServerConfigError` naming the keys."""
    try:
        yield
    except TypeError as error:
        if "unexpected keyword argument" not in str(error):
            raise
        raise ServerConfigError(
            f"strategy {settings.strategy!r} or its dp wrapper {settings.dp!r} does not take an option given: "
            f"{error}; fix run-config strategy-options / dp-options (Flower's argument names)"
        ) from None
