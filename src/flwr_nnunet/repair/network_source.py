"""The network an nnU-Net checkpoint was trained with, and its alias groups.

The keys of a checkpoint whose aliases lost their shared storage no longer show
which keys name one tensor; the network nnU-Net builds from the checkpoint's
plans (exactly as its predictor does) still does.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flwr_nnunet.core.aliasing import AliasMap, strip_wrapper_prefixes
from flwr_nnunet.nnunet.checkpoint_io import CheckpointError, RepairRefused
from flwr_nnunet.nnunet.networks import build_plans_network, build_trainer_network, network_channels

__all__ = ["ModelSource", "NetworkHints", "find_model_source", "reference_alias_map"]

_DEFAULT_TRAINER = "nnUNetTrainer"


@dataclass(frozen=True)
class NetworkHints:
    """What the user says about a checkpoint's network; each overrides what the checkpoint says.

    Attributes
    ----------
    plans_file, dataset_json_file
        nnU-Net ``plans.json`` and ``dataset.json`` the checkpoint was trained with.
    configuration
        The plans configuration (``2d``, ``3d_fullres``, ...).
    trainer_name
        The trainer class whose ``build_network_architecture`` made the network.
    """

    plans_file: str | os.PathLike | None = None
    dataset_json_file: str | os.PathLike | None = None
    configuration: str | None = None
    trainer_name: str | None = None


@dataclass(frozen=True)
class ModelSource:
    """What nnU-Net needs to rebuild a checkpoint's network.

    Attributes
    ----------
    plans, dataset_json
        The plans and dataset.json dicts.
    configuration
        The plans configuration (``2d``, ``3d_fullres``, ...).
    trainer_name
        The trainer class whose ``build_network_architecture`` made the network.
    origin
        Where plans and dataset.json were found, for the report.
    """

    plans: dict
    dataset_json: dict
    configuration: str
    trainer_name: str
    origin: str


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as error:
        raise CheckpointError(f"cannot read {what} {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{what} {path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} does not hold a JSON object")
    return data


def find_model_source(
    container: Mapping[str, Any] | None, path: str | os.PathLike, hints: NetworkHints = NetworkHints()
) -> ModelSource | None:
    """Find the plans, dataset.json, configuration and trainer of a checkpoint.

    Each comes from the command line when given, else from the checkpoint's
    ``init_args`` / ``trainer_name``, else from ``plans.json`` / ``dataset.json``
    of the nnU-Net model folder the checkpoint lies in (``<model>/fold_X/ckpt``);
    a plans file with a single configuration needs no ``configuration``.

    Parameters
    ----------
    container
        The checkpoint dict (None for a plain state_dict).
    path
        The checkpoint file.
    hints
        Explicit choices that override what the checkpoint says.

    Returns
    -------
    ModelSource or None
        None when no plans can be found at all.

    Raises
    ------
    RepairRefused
        If plans are found but dataset.json or the configuration cannot be.
    """
    init_args = (container or {}).get("init_args")
    init_args = init_args if isinstance(init_args, Mapping) else {}
    model_folder = Path(path).resolve().parent.parent
    plans, plans_origin = _pick(hints.plans_file, init_args.get("plans"), model_folder / "plans.json", "plans")
    if plans is None:
        return None
    dataset_json, dataset_origin = _pick(
        hints.dataset_json_file, init_args.get("dataset_json"), model_folder / "dataset.json", "dataset.json"
    )
    if dataset_json is None:
        raise RepairRefused(f"found plans ({plans_origin}) but no dataset.json: pass --dataset-json")
    configurations = plans.get("configurations") or {}
    configuration = hints.configuration or init_args.get("configuration")
    if configuration is None and len(configurations) == 1:
        configuration = next(iter(configurations))
    if configuration not in configurations:
        raise RepairRefused(
            f"configuration {configuration!r} is not in the plans (they have {sorted(configurations)}): "
            "pass --configuration"
        )
    trainer = hints.trainer_name or (container or {}).get("trainer_name") or _DEFAULT_TRAINER
    origin = (
        f"plans and dataset.json from {plans_origin}"
        if plans_origin == dataset_origin
        else f"plans from {plans_origin}, dataset.json from {dataset_origin}"
    )
    return ModelSource(plans, dataset_json, configuration, str(trainer), origin)


def _pick(explicit: str | os.PathLike | None, embedded: Any, beside: Path, what: str) -> tuple[dict | None, str]:
    if explicit is not None:
        return _read_json(Path(explicit), what), str(explicit)
    if isinstance(embedded, Mapping):
        return dict(embedded), "the checkpoint's init_args"
    if beside.is_file():
        return _read_json(beside, what), str(beside)
    return None, ""


def _build_reference_network(source: ModelSource) -> tuple[nn.Module, str]:
    """The network nnU-Net's predictor builds for ``source``, and how it was built."""
    inputs, outputs = network_channels(source.plans, source.dataset_json, source.configuration)
    described = f"{inputs} input channel{'s' * (inputs != 1)}, {outputs} outputs"
    if source.trainer_name != _DEFAULT_TRAINER:
        try:
            network = build_trainer_network(
                source.plans, source.dataset_json, source.configuration, source.trainer_name, deep_supervision=False
            )
        except ValueError:
            pass
        else:
            return network, f"the network {source.trainer_name} builds ({described})"
    network = build_plans_network(source.plans, source.dataset_json, source.configuration, deep_supervision=False)
    how = f"the plans architecture ({described})"
    if source.trainer_name != _DEFAULT_TRAINER:
        how += f"; trainer {source.trainer_name} is not installed here, so its own network could not be built"
    return network, how


def reference_alias_map(state_dict: Mapping[str, torch.Tensor], source: ModelSource) -> tuple[AliasMap, dict, str]:
    """The alias groups of ``state_dict``'s keys in the network nnU-Net builds from ``source``.

    Parameters
    ----------
    state_dict
        The checkpoint's weights; ``_orig_mod.`` / ``module.`` prefixes are allowed.
    source
        Plans, dataset.json, configuration and trainer (see :func:`find_model_source`).

    Returns
    -------
    tuple
        ``(alias_map, reference, description)``: the map over ``state_dict``'s own
        keys, the network's tensor for each key (for shapes and dtypes; with the
        network's ``_metadata`` when the keys carry no wrapper prefix), and how
        the groups were found.

    Raises
    ------
    RepairRefused
        If the network cannot be built or its keys or shapes differ from the checkpoint's.
    """
    try:
        network, how = _build_reference_network(source)
    except (KeyError, ValueError, TypeError, RuntimeError, ImportError, AttributeError) as error:
        raise RepairRefused(
            f"cannot build the network of configuration {source.configuration!r} ({source.origin}): "
            f"{type(error).__name__}: {error}"
        ) from None
    reference = network.state_dict(keep_vars=True)
    network_map = AliasMap.from_state_dict(reference)
    original_of = dict(zip(strip_wrapper_prefixes(state_dict), state_dict))
    missing = [k for k in reference if k not in original_of]
    unknown = [original_of[k] for k in original_of if k not in reference]
    if missing or unknown:
        raise RepairRefused(
            f"the checkpoint does not match {how} for configuration {source.configuration!r}: "
            f"{len(missing)} keys missing (first: {missing[:2]}), {len(unknown)} unknown (first: {unknown[:2]}); "
            "pass the plans it was trained with (--plans, --dataset-json, --configuration, --trainer)"
        )
    for key, tensor in reference.items():
        given = state_dict[original_of[key]]
        if given.shape != tensor.shape:
            raise RepairRefused(
                f"{original_of[key]!r} has shape {tuple(given.shape)} but {how} expects {tuple(tensor.shape)}"
            )
    groups = [tuple(original_of[k] for k in group) for group in network_map.groups.values()]
    reference_by_key = OrderedDict((original_of[k], t) for k, t in reference.items())
    if all(k == v for k, v in original_of.items()):
        reference_by_key._metadata = reference._metadata
    description = f"{how}, configuration {source.configuration!r}; {source.origin}"
    return AliasMap(list(state_dict), groups), reference_by_key, description
