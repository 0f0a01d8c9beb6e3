"""A site's personal model: where it is written, and the learning-rate schedule that fine-tunes it.

A personal model never leaves its site. It is written as an nnU-Net model folder at the site, beside the
site's trainer output, so that ``nnUNetv2_predict`` uses it with ``-chk checkpoint_personal.pth``::

    <site nnUNet_results>/<dataset>/<Trainer>__<Plans>__<configuration>/
        plans.json  dataset.json
        fold_<fold>/checkpoint_personal.pth

The checkpoint holds nnU-Net's keys (``network_weights`` with every key, the aliases sharing storage,
``trainer_name``, ``init_args``, ``inference_allowed_mirroring_axes``) and :data:`PERSONAL_KEY`, which says
how the model was made and the validation Dice it was chosen on. It loads with ``weights_only=True``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr_nnunet.nnunet.checkpoint_io import atomic_save, atomic_write, load_checkpoint
from flwr_nnunet.site.spec import SiteSpec
from flwr_nnunet.site.trainer_state import trainer_state

__all__ = ["PERSONAL_CHECKPOINT", "PERSONAL_KEY", "FineTuneSchedule", "personal_model_file", "save_personal_model"]

PERSONAL_CHECKPOINT = "checkpoint_personal.pth"
"""The personal model's file name in the site's fold folder (``nnUNetv2_predict ... -chk checkpoint_personal.pth``)."""

PERSONAL_KEY = "flwr_nnunet_personal"
"""The checkpoint entry describing the personal model: ``kind`` (``fine-tuned``, ``global``, ``mr-mtl`` or
``local-groups``: the global model with the site's own local groups, e.g. its normalization layers),
``server_round``, ``validation_dice`` and, where it was compared, ``global_validation_dice``."""

_NNUNET_KEYS = ("network_weights", "trainer_name", "init_args", "inference_allowed_mirroring_axes", "current_epoch")


def personal_model_file(spec: SiteSpec) -> Path:
    """``<fold folder>/checkpoint_personal.pth`` of the site."""
    return spec.output_folder / PERSONAL_CHECKPOINT


def _write_json_once(path: Path, data: Mapping[str, Any]) -> None:
    if not path.is_file():
        text = json.dumps(data, indent=4).encode()
        atomic_write(path, lambda file: file.write(text))


def save_personal_model(spec: SiteSpec, trainer: Any, about: Mapping[str, Any]) -> Path:
    """Write the trainer's network as the site's personal model (atomically; it must read back safely).

    ``about`` becomes the checkpoint's :data:`PERSONAL_KEY` entry (plain values only). The model folder's
    ``plans.json`` and ``dataset.json`` are written when the trainer has not written them yet.
    """
    state = trainer_state(trainer)
    checkpoint = {key: state[key] for key in _NNUNET_KEYS}
    checkpoint[PERSONAL_KEY] = dict(about)
    model_folder = spec.output_folder.parent
    model_folder.mkdir(parents=True, exist_ok=True)
    _write_json_once(model_folder / "plans.json", trainer.plans_manager.plans)
    _write_json_once(model_folder / "dataset.json", trainer.dataset_json)
    return atomic_save(checkpoint, personal_model_file(spec), check=load_checkpoint)


class FineTuneSchedule:
    """nnU-Net's polynomial learning-rate decay over the ``epochs`` epochs that start at epoch ``start``.

    The trainer calls ``step(current_epoch)`` at the start of every epoch (as it calls its ``PolyLRScheduler``);
    the learning rate is ``initial_lr * (1 - (epoch - start) / epochs) ** 0.9``.
    """

    exponent = 0.9

    def __init__(self, optimizer: Any, initial_lr: float, start: int, epochs: int):
        if epochs < 1:
            raise ValueError(f"fine-tuning needs at least one epoch, got {epochs}")
        self.optimizer = optimizer
        self.initial_lr = float(initial_lr)
        self.start = int(start)
        self.epochs = int(epochs)

    def learning_rate(self, epoch: int) -> float:
        """The learning rate of ``epoch`` (clamped to the fine-tuning epochs)."""
        done = min(max(epoch - self.start, 0), self.epochs - 1)
        return self.initial_lr * (1 - done / self.epochs) ** self.exponent

    def step(self, current_step: int) -> None:
        """Set every parameter group's learning rate for epoch ``current_step``."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(current_step)
