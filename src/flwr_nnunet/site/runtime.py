"""Building and running a site's nnU-Net trainer: seeding, CPU worker defaults, schedule, epochs, progress plot,
metrics."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import json
import math
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from flwr_nnunet.nnunet.memory_fit import fit_to_memory
from flwr_nnunet.nnunet.networks import trainer_class
from flwr_nnunet.nnunet.planning import nnunet_environment
from flwr_nnunet.site.fedprox import ProximalLoss
from flwr_nnunet.site.spec import SiteError, SiteSpec

__all__ = [
    "PlotLater",
    "build_trainer",
    "cpu_worker_defaults",
    "epoch_metrics",
    "progress_plot_once",
    "run_epoch",
    "seed_everything",
    "set_schedule",
]


def build_trainer(spec: SiteSpec, plans: dict, resume: bool) -> Any:
    """A new (uninitialised) trainer of the class ``spec.trainer`` names, on the site's plans (with its own batch
    and patch when the spec lowers them), fold and device.

    Its plans printout goes to nnU-Net's training log file only (:func:`_plans_to_log_file_only`).

    Raises
    ------
    SiteError
        If ``spec.trainer`` names no trainer class, or its batch or patch does not fit the plans.
    """
    try:
        cls = trainer_class(spec.trainer)
    except ValueError as error:
        raise SiteError(f"{spec.name}: {error}; set run-config 'trainer'") from None
    dataset_json = json.loads((spec.dataset_folder / "dataset.json").read_text())
    try:
        fitted = fit_to_memory(plans, spec.configuration, batch_size=spec.batch_size, patch_size=spec.patch_size)
    except ValueError as error:
        raise SiteError(f"{spec.name}: {error}; change node-config 'batch-size' / 'patch-size'") from None
    plans = {**fitted, "continue_training": resume}
    with nnunet_environment(preprocessed=spec.nnunet_preprocessed, results=spec.nnunet_results):
        trainer = cls(
            plans=plans,
            configuration=spec.configuration,
            fold=spec.fold,
            dataset_json=dataset_json,
            device=spec.torch_device(),
        )
    _plans_to_log_file_only(trainer)
    return trainer


def _plans_to_log_file_only(trainer: Any) -> None:
    """Keep the trainer's plans printout (``print_plans``, which ``on_train_start`` calls) off stdout.

    nnU-Net's ``print_plans`` writes the configuration and the plans dictionary to the trainer's
    ``training_log_*.txt`` and echoes both to stdout, each time a trainer starts training: in deployment every
    training round at every site, since each message gets a fresh process. Here an instance attribute shadows
    the method: it calls nnU-Net's own (or the trainer class's override) with stdout redirected into a buffer
    that is dropped, so the log file keeps the plans. Whatever else nnU-Net prints, and stderr, are untouched.
    """
    print_plans = trainer.print_plans

    def print_plans_to_log_file() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            print_plans()

    trainer.print_plans = print_plans_to_log_file


def seed_everything(seed: int, server_round: int, name: str) -> None:
    """Seed Python's, numpy's and torch's generators from the run's ``seed``, the round and the site's name."""
    mixed = int.from_bytes(hashlib.sha256(f"{seed}/{server_round}/{name}".encode()).digest()[:4], "little")
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


@contextmanager
def cpu_worker_defaults(device: torch.device) -> Iterator[None]:
    """On CPU, run nnU-Net's augmentation in-process unless ``nnUNet_n_proc_DA`` says otherwise.

    Augmentation workers would compete with the training for the same cores
    and cost seconds to start in every fresh SuperNode process.
    """
    if device.type != "cpu" or "nnUNet_n_proc_DA" in os.environ:
        yield
        return
    os.environ["nnUNet_n_proc_DA"] = "0"
    try:
        yield
    finally:
        os.environ.pop("nnUNet_n_proc_DA", None)


PlotLater = Callable[[Callable[[], None]], None]
"""What takes a round's progress plot to draw later: the drawing, a call without arguments."""


@contextmanager
def progress_plot_once(trainer: Any, later: PlotLater | None = None) -> Iterator[None]:
    """Draw nnU-Net's ``progress.png`` once at the end of a round instead of after every epoch (about 1 s each).

    With ``later``, the round does not draw it: ``later`` gets the drawing of the logs as they are at the round's
    end, to run when it suits (the warm worker's: once it has replied).
    """
    logger = trainer.logger
    logger.plot_progress_png = lambda output_folder: None
    try:
        yield
    finally:
        del logger.plot_progress_png
        if later is None:
            logger.plot_progress_png(trainer.output_folder)
        else:
            later(_progress_plot(logger.get_checkpoint(), trainer.output_folder))


def _progress_plot(logs: dict, folder: str) -> Callable[[], None]:
    """Drawing ``progress.png`` into ``folder`` from a copy of ``logs`` (a trainer logger's checkpoint): the
    trainer may train on before it is drawn."""
    from nnunetv2.training.logging.nnunet_logger import LocalLogger

    snapshot = LocalLogger()
    snapshot.load_checkpoint(copy.deepcopy(logs))
    return functools.partial(snapshot.plot_progress_png, folder)


def set_schedule(trainer: Any, num_epochs: int) -> None:
    """Make ``num_epochs`` the trainer's total, and the end of its PolyLR schedule where it has one."""
    trainer.num_epochs = num_epochs
    if trainer.lr_scheduler is not None and hasattr(trainer.lr_scheduler, "max_steps"):
        trainer.lr_scheduler.max_steps = num_epochs


def run_epoch(trainer: Any) -> None:
    """One nnU-Net epoch through the trainer's own hooks (FedProx term only on the training steps)."""
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(trainer.num_iterations_per_epoch)]
    trainer.on_train_epoch_end(outputs)
    loss = trainer.loss
    if isinstance(loss, ProximalLoss):
        trainer.loss = loss.loss
    with torch.no_grad():
        trainer.on_validation_epoch_start()
        outputs = [
            trainer.validation_step(next(trainer.dataloader_val)) for _ in range(trainer.num_val_iterations_per_epoch)
        ]
        trainer.on_validation_epoch_end(outputs)
    trainer.loss = loss
    trainer.on_epoch_end()


def _finite(value: Any) -> float:
    value = float(value)
    return value if math.isfinite(value) else 0.0


def epoch_metrics(trainer: Any) -> dict[str, float | int | list[float]]:
    """The trainer's last epoch: ``train-loss``, ``val-loss``, ``pseudo-dice`` (mean foreground),
    ``pseudo-dice-per-class`` (non-finite values as 0), ``epoch`` (the next to run) and ``learning-rate``."""
    logger = trainer.logger
    return {
        "train-loss": _finite(logger.get_value("train_losses", step=-1)),
        "val-loss": _finite(logger.get_value("val_losses", step=-1)),
        "pseudo-dice": _finite(logger.get_value("mean_fg_dice", step=-1)),
        "pseudo-dice-per-class": [_finite(d) for d in logger.get_value("dice_per_class_or_region", step=-1)],
        "epoch": int(trainer.current_epoch),
        "learning-rate": float(trainer.optimizer.param_groups[0]["lr"]),
    }
