"""Global checkpoints in nnU-Net's own results layout, written atomically.

An :class:`NnUNetModelFolder` is the folder ``nnUNetv2_predict -f all`` reads::

    <results>/Dataset<ID>_<Name>/<Trainer>__<Plans>__<configuration>/
        plans.json  dataset.json  dataset_fingerprint.json
        fold_all/checkpoint_latest.pth    every round (with the strategy state, for resume)
        fold_all/checkpoint_previous.pth  the latest before it (fallback when latest is damaged)
        fold_all/checkpoint_best.pth      when the aggregated evaluation Dice improves
        fold_all/checkpoint_final.pth     at the end of the run

A cross-validation fold's global model goes to ``fold_<k>/`` instead (``fold=k``), where
``nnUNetv2_predict -f 0 1 2 3 4`` finds it.

Each checkpoint holds nnU-Net's keys (``network_weights`` with every key and the
aliases sharing storage, ``trainer_name``, ``init_args``,
``inference_allowed_mirroring_axes``) and an ``flwr_nnunet`` entry (round,
digests, strategy state). Everything loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.supercore import log
from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

from flwr_nnunet.core.aliasing import AliasMap
from flwr_nnunet.nnunet.checkpoint_io import (
    CheckpointError,
    atomic_save,
    atomic_write,
    fsync_directory,
    load_checkpoint,
    remove_orphan_temp_files,
    temp_path,
)
from flwr_nnunet.nnunet.digests import tensors_sha256

__all__ = ["CHECKPOINT_NAMES", "STATE_KEY", "CheckpointError", "NnUNetModelFolder"]

CHECKPOINT_NAMES = ("latest", "previous", "best", "final")
STATE_KEY = "flwr_nnunet"
STATE_FORMAT = "flwr-nnunet/global-checkpoint"
STATE_VERSION = 1


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=4, sort_keys=False).encode()
    atomic_write(path, lambda handle: handle.write(text))


class NnUNetModelFolder:
    """The nnU-Net model folder that receives the global model.

    Parameters
    ----------
    path
        The model folder, ``<results>/Dataset<ID>_<Name>/<Trainer>__<Plans>__<configuration>``
        (see :meth:`in_results`).
    plans
        The nnU-Net plans dict every site trains with.
    dataset_json
        The dataset's ``dataset.json`` dict.
    dataset_fingerprint
        The ``dataset_fingerprint.json`` dict (None: the file is not written).
    configuration
        The plans configuration, e.g. ``"2d"`` or ``"3d_fullres"``.
    trainer_name
        The trainer class the predictor builds the network with; a custom
        trainer must be findable on the predicting host (``nnUNet_extTrainer``).
    inference_allowed_mirroring_axes
        Mirroring axes for test-time augmentation (None: nnU-Net's default, all axes).
    fold
        ``"all"`` (the federation's model: ``fold_all/``) or a cross-validation fold ``k >= 0``
        (``fold_<k>/``, ``init_args['fold'] == k``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        plans: dict,
        dataset_json: dict,
        dataset_fingerprint: dict | None,
        configuration: str,
        trainer_name: str = "nnUNetTrainer",
        inference_allowed_mirroring_axes: tuple[int, ...] | None = None,
        fold: int | str = "all",
    ) -> None:
        if str(fold) != "all" and not (str(fold).isdigit() and not isinstance(fold, bool)):
            raise ValueError(f"fold must be 'all' or a cross-validation fold (an integer >= 0), got {fold!r}")
        if configuration not in plans.get("configurations", {}):
            raise ValueError(
                f"configuration {configuration!r} is not in the plans (have {sorted(plans.get('configurations', {}))})"
            )
        self.path = Path(path)
        self.plans = plans
        self.dataset_json = dataset_json
        self.dataset_fingerprint = dataset_fingerprint
        self.configuration = configuration
        self.trainer_name = trainer_name
        self.inference_allowed_mirroring_axes = inference_allowed_mirroring_axes
        self.fold: int | str = "all" if str(fold) == "all" else int(fold)

    @classmethod
    def in_results(
        cls,
        results: str | os.PathLike,
        plans: dict,
        dataset_json: dict,
        dataset_fingerprint: dict | None,
        configuration: str,
        **options: Any,
    ) -> NnUNetModelFolder:
        """The folder ``nnUNetv2_predict`` finds under ``results`` (``$nnUNet_results``) for these plans.

        ``options`` are the constructor's ``trainer_name``, ``inference_allowed_mirroring_axes`` and ``fold``.
        """
        trainer_name = options.get("trainer_name", "nnUNetTrainer")
        model = convert_trainer_plans_config_to_identifier(trainer_name, plans["plans_name"], configuration)
        path = Path(results) / plans["dataset_name"] / model
        return cls(path, plans, dataset_json, dataset_fingerprint, configuration, **options)

    def __repr__(self) -> str:
        return f"NnUNetModelFolder({str(self.path)!r}, configuration={self.configuration!r})"

    @property
    def fold_dir(self) -> Path:
        """``fold_all`` (or ``fold_<k>``): where the checkpoints go."""
        return self.path / f"fold_{self.fold}"

    def checkpoint_path(self, name: str) -> Path:
        """``fold_all/checkpoint_<name>.pth`` (or ``fold_<k>/``) for a name in :data:`CHECKPOINT_NAMES`."""
        if name not in CHECKPOINT_NAMES:
            raise ValueError(f"checkpoint name must be one of {CHECKPOINT_NAMES}, got {name!r}")
        return self.fold_dir / f"checkpoint_{name}.pth"

    def write_metadata(self) -> None:
        """Write plans.json, dataset.json and dataset_fingerprint.json (atomically)."""
        _write_json(self.path / "plans.json", self.plans)
        _write_json(self.path / "dataset.json", self.dataset_json)
        if self.dataset_fingerprint is not None:
            _write_json(self.path / "dataset_fingerprint.json", self.dataset_fingerprint)

    def remove_orphan_temp_files(self) -> list[Path]:
        """Remove the temp files killed writers left in the model folder and its fold folder; the removed ones."""
        return [*remove_orphan_temp_files(self.path), *remove_orphan_temp_files(self.fold_dir)]

    def save_checkpoint(
        self,
        name: str,
        network_weights: Mapping[str, torch.Tensor],
        state: Mapping[str, Any],
    ) -> Path:
        """Write ``checkpoint_<name>.pth`` atomically; ``latest`` first moves the old one to ``previous``.

        Parameters
        ----------
        name
            One of ``latest``, ``best``, ``final``.
        network_weights
            Every key of the network's state_dict on the CPU, aliases sharing storage.
        state
            The ``flwr_nnunet`` entry (round, digests, strategy state); only
            types ``torch.load(weights_only=True)`` reads.
        """
        path = self.checkpoint_path(name)
        checkpoint = {
            "network_weights": dict(network_weights),
            "trainer_name": self.trainer_name,
            "init_args": {
                "plans": self.plans,
                "configuration": self.configuration,
                "fold": self.fold,
                "dataset_json": self.dataset_json,
            },
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            STATE_KEY: {"format": STATE_FORMAT, "version": STATE_VERSION, **state},
        }
        if name != "latest":
            return atomic_save(checkpoint, path)
        tmp = atomic_save(checkpoint, temp_path(path))
        if path.exists():
            os.replace(path, self.checkpoint_path("previous"))
        os.replace(tmp, path)
        fsync_directory(path.parent)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        """Read one checkpoint with ``weights_only=True`` and verify its weights digest.

        Raises
        ------
        CheckpointError
            If the file is missing, unreadable or truncated, lacks the entries
            this project writes, or its weights do not match the stored digest.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint")
        checkpoint = load_checkpoint(path)
        state = checkpoint.get(STATE_KEY) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path}: not a flwr-nnunet global checkpoint")
        weights = checkpoint.get("network_weights")
        try:
            canonical = AliasMap.from_state_dict(weights).collapse(weights)
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise CheckpointError(f"{path}: bad network_weights ({error})") from None
        if tensors_sha256(canonical) != state.get("weights_sha256"):
            raise CheckpointError(f"{path}: network_weights do not match their stored digest (damaged file)")
        return checkpoint

    def load_latest(self) -> tuple[dict, Path] | None:
        """The newest intact checkpoint to resume from; None if the folder has none.

        Tried in order: ``latest``, ``previous``, then ``best`` and ``final``, the one holding the later
        round first (``final`` on a tie). A damaged one is skipped with a warning naming it and the problem;
        the one used is logged.

        Raises
        ------
        CheckpointError
            If checkpoints exist but none of them is readable and intact (listing each one's problem).
        """
        problems: list[str] = []
        for name in ("latest", "previous"):
            found = self._intact(name, problems)
            if found is not None:
                return self._used(name, found, problems)
        fallbacks = [(name, found) for name in ("best", "final") if (found := self._intact(name, problems))]
        if fallbacks:
            name, found = max(reversed(fallbacks), key=lambda item: _server_round(item[1][0]))
            return self._used(name, found, problems)
        if problems:
            raise CheckpointError(
                "no intact checkpoint to resume from: "
                + "; ".join(problems)
                + " (start a new run with another results folder, or restore a checkpoint from a backup)"
            )
        return None

    def _intact(self, name: str, problems: list[str]) -> tuple[dict, Path] | None:
        """``checkpoint_<name>.pth`` loaded and verified, or None (missing; damaged: its problem is logged and
        added to ``problems``)."""
        path = self.checkpoint_path(name)
        if not path.exists():
            return None
        try:
            return self.load_checkpoint(path), path
        except CheckpointError as error:
            log(WARNING, "resume: %s; trying the next checkpoint", error)
            problems.append(str(error))
            return None

    @staticmethod
    def _used(name: str, found: tuple[dict, Path], problems: list[str]) -> tuple[dict, Path]:
        if problems:
            log(
                WARNING,
                "resume: using checkpoint_%s.pth (round %s): %d newer checkpoint(s) damaged",
                name,
                _server_round(found[0]),
                len(problems),
            )
        return found


def _server_round(checkpoint: Mapping[str, Any]) -> int:
    """The round a loaded global checkpoint holds (-1 if it does not say)."""
    value = checkpoint.get(STATE_KEY, {}).get("server_round")
    return value if isinstance(value, int) and not isinstance(value, bool) else -1
