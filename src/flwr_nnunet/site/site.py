"""One hospital of the federation: an nnU-Net trainer on the site's own preprocessed data.

A :class:`Site` keeps one nnU-Net trainer (``nnUNetTrainer`` or any trainer
class named by the run config) alive across rounds. Each round it loads the
global canonical tensors into the live network *in place* (the optimizer keeps
its references and momentum), trains the configured local epochs with nnU-Net's
own epoch hooks, and returns the network's canonical tensors with its metrics.

The learning-rate schedule (nnU-Net's PolyLR) runs over the whole federation:
``num_epochs`` is the federation's total (rounds x local epochs) and the
epoch counter keeps counting across rounds, never past the end.

Where the process does not survive between rounds (a Flower SuperNode starts a
fresh process per message) the trainer is rebuilt from the site's state file,
an nnU-Net trainer checkpoint written after every round
(``<fold folder>/flwr_site_state.pth``), which gives the same epoch counter,
learning rate, optimizer state and logs as the live trainer. The file holds only
tensors and plain Python values and is read with the project's safe loader
(``weights_only=True``), never with nnU-Net's ``load_checkpoint`` (which unpickles anything).
The states after the last :data:`KEPT_ROUNDS` rounds stay beside it (``flwr_site_state.round-<r>.pth``, hard
links): a server that resumed from an earlier checkpoint sends a round the site trained already, and the site
goes back to its state after the round before (:meth:`Site.agree_on_round`), so every round is trained once.

A site validates a whole instruction before it touches its trainer: a
non-finite global model, keys or shapes that do not fit its network, or a
mismatching alias map are refused, and a round whose training ends non-finite
is refused without writing the state file, so the previous round's state stays.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.supercore import log
from torch import nn

from flwr_nnunet.core.aliasing import AliasMap
from flwr_nnunet.core.reduce import assign_
from flwr_nnunet.errors import KeyMismatchError
from flwr_nnunet.nnunet.checkpoint_io import CheckpointError, atomic_save, atomic_write, load_checkpoint
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.nnunet.metrics import dice_from_counts, voxel_counts
from flwr_nnunet.nnunet.networks import trainer_class
from flwr_nnunet.nnunet.planning import nnunet_environment
from flwr_nnunet.site.fedprox import ProximalLoss
from flwr_nnunet.site.spec import SiteError, SiteSpec, TrainOptions

__all__ = ["Site"]


def _seed_everything(seed: int, server_round: int, name: str) -> None:
    mixed = int.from_bytes(hashlib.sha256(f"{seed}/{server_round}/{name}".encode()).digest()[:4], "little")
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


@contextmanager
def _cpu_worker_defaults(device: torch.device) -> Iterator[None]:
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


@contextmanager
def _progress_plot_once(trainer: Any) -> Iterator[None]:
    """Draw nnU-Net's ``progress.png`` once at the end of a round instead of after every epoch (about 1 s each)."""
    logger = trainer.logger
    logger.plot_progress_png = lambda output_folder: None
    try:
        yield
    finally:
        del logger.plot_progress_png
        logger.plot_progress_png(trainer.output_folder)


def _finite(value: Any) -> float:
    value = float(value)
    return value if math.isfinite(value) else 0.0


def first_non_finite(tensors: Mapping[str, Any]) -> str | None:
    """The first key (in ``tensors``' order) of a floating-point tensor holding NaN or Inf, else ``None``."""
    for key, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return key
    return None


def _unwrapped(network: nn.Module) -> nn.Module:
    return getattr(network, "_orig_mod", network)


def _optimizer_tensors(optimizer_state: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer state_dict's per-parameter tensors as ``'optimizer <index> <name>'`` -> tensor."""
    return {
        f"optimizer state {index} {name}": value
        for index, entries in optimizer_state.get("state", {}).items()
        for name, value in entries.items()
    }


def _first_non_finite_state(weights: Mapping[str, Any], optimizer_state: Mapping[str, Any]) -> str | None:
    """The first non-finite entry of network weights, then of the optimizer state (e.g. SGD momentum)."""
    return first_non_finite(weights) or first_non_finite(_optimizer_tensors(optimizer_state))


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into Python numbers and lists (containers rebuilt)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    return value


def trainer_state(trainer: Any) -> dict[str, Any]:
    """The round state of a trainer: the entries of ``nnUNetTrainer.save_checkpoint``, tensors and plain values only.

    ``current_epoch`` is the trainer's counter as it is between epochs (the next epoch to run), which is what
    nnU-Net's own ``save_checkpoint`` stores from inside ``on_epoch_end`` (its ``+ 1``); ``_best_ema`` and the
    logged values are Python floats, so the file loads with ``weights_only=True`` and no numpy globals.
    """
    best = trainer._best_ema
    return {
        "network_weights": _unwrapped(trainer.network).state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": _plain(trainer.logger.get_checkpoint()),
        "_best_ema": None if best is None else float(best),
        "current_epoch": int(trainer.current_epoch),
        "init_args": _plain(trainer.my_init_kwargs),
        "trainer_name": type(trainer).__name__,
        "inference_allowed_mirroring_axes": _plain(trainer.inference_allowed_mirroring_axes),
    }


_STATE_KEYS = ("network_weights", "optimizer_state", "logging", "current_epoch")


def restore_trainer(trainer: Any, state: Any) -> None:
    """Hand a safely loaded round state to an initialised trainer (what ``nnUNetTrainer.load_checkpoint`` does).

    Network weights (strictly: every key), optimizer state, grad scaler, logs,
    ``current_epoch`` (stored as the next epoch to run, see :func:`trainer_state`),
    ``_best_ema`` and the mirroring axes. The trainer keeps its own ``init_args``:
    it was built from this site's plans, which the file does not override.

    Raises
    ------
    ValueError
        If ``state`` is not a round state or holds non-finite weights or optimizer state.
    """
    if not isinstance(state, Mapping) or any(key not in state for key in _STATE_KEYS):
        raise ValueError(f"it is not a site round state (it needs the entries {list(_STATE_KEYS)})")
    weights, optimizer_state, logging = state["network_weights"], state["optimizer_state"], state["logging"]
    if not isinstance(weights, Mapping) or not isinstance(optimizer_state, Mapping):
        raise ValueError("'network_weights' and 'optimizer_state' must be mappings")
    own_logging = trainer.logger.get_checkpoint()
    if not isinstance(logging, Mapping) or any(not isinstance(logging.get(key), list) for key in own_logging):
        raise ValueError(f"'logging' must map each of {sorted(own_logging)} to a list")
    epoch, best = state["current_epoch"], state.get("_best_ema")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"'current_epoch' must be an integer >= 0, not {epoch!r}")
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float))):
        raise ValueError(f"'_best_ema' must be a number or None, not {type(best).__name__}")
    bad = _first_non_finite_state(weights, optimizer_state)
    if bad is not None:
        raise ValueError(f"{bad!r} holds NaN or Inf")
    _unwrapped(trainer.network).load_state_dict(weights)
    trainer.optimizer.load_state_dict(optimizer_state)
    if trainer.grad_scaler is not None and state.get("grad_scaler_state") is not None:
        trainer.grad_scaler.load_state_dict(state["grad_scaler_state"])
    trainer.logger.load_checkpoint({key: list(value) for key, value in logging.items()})
    trainer.current_epoch = epoch
    trainer._best_ema = best
    if "inference_allowed_mirroring_axes" in state:
        axes = state["inference_allowed_mirroring_axes"]
        trainer.inference_allowed_mirroring_axes = None if axes is None else tuple(axes)


KEPT_ROUNDS = 3
"""Rounds whose end state a site keeps (``flwr_site_state.round-<r>.pth``): a server resumed from its latest or
previous checkpoint finds every site able to go back to that round."""


def round_state_file(spec: SiteSpec, server_round: int) -> Path:
    """The site's state after ``server_round``, kept beside the round state."""
    return spec.output_folder / f"flwr_site_state.round-{server_round}.pth"


def _link_or_copy(source: Path, destination: Path) -> None:
    """``destination`` becomes ``source``'s content, atomically: a hard link (a copy where links fail), renamed."""
    temp = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.tmp")
    try:
        os.link(source, temp)
    except OSError:
        shutil.copyfile(source, temp)
    os.replace(temp, destination)


def _keep_round_state(spec: SiteSpec, server_round: int) -> None:
    """Keep the state just written as the state after ``server_round``; drop those older than :data:`KEPT_ROUNDS`."""
    _link_or_copy(spec.state_file, round_state_file(spec, server_round))
    for path in spec.output_folder.glob("flwr_site_state.round-*.pth"):
        kept = path.name.removeprefix("flwr_site_state.round-").removesuffix(".pth")
        if kept.isdigit() and int(kept) <= server_round - KEPT_ROUNDS:
            path.unlink(missing_ok=True)


class Site:
    """One site: a persistent nnU-Net trainer across rounds, its checks, training and evaluation.

    Parameters
    ----------
    spec
        The site's folders and training setup.

    Notes
    -----
    The trainer is built on first use: from the state file when one exists and
    the round is not the first, otherwise fresh. Call :meth:`check` first to get
    clear errors for a missing or unprepared dataset.
    """

    def __init__(self, spec: SiteSpec):
        self.spec = spec
        self.trainer: Any = None
        self._data_loaders_ready = False
        self._alias_map: AliasMap | None = None
        self._state_token: str | None = None

    # ----------------------------------------------------------------- checks
    def check(self, plans_sha: str | None = None) -> dict:
        """The site's plans, after checking the dataset is there, preprocessed and planned like the server's.

        Raises
        ------
        SiteError
            Naming what is missing or different and the nnU-Net command or key that fixes it.
        """
        spec, folder = self.spec, self.spec.dataset_folder
        where = "node-config 'nnunet-preprocessed' (deployment) or run-config 'data-root' (simulation)"
        if not folder.is_dir():
            raise SiteError(
                f"{spec.name}: dataset folder {folder} not found; point {where} at the site's nnUNet_preprocessed "
                f"root, or plan and preprocess the dataset: {spec.fix_command('plans')}"
            )
        plans_file = folder / f"{spec.plans}.json"
        if not plans_file.is_file():
            raise SiteError(f"{spec.name}: plans {plans_file} not found; {spec.fix_command('plans')}")
        plans = json.loads(plans_file.read_text())
        if plans_sha is not None and plans_sha256(plans) != plans_sha:
            raise SiteError(
                f"{spec.name}: {plans_file} differs from the server's plans (plans-sha256 "
                f"{plans_sha256(plans)[:12]}... != {plans_sha[:12]}...); {spec.fix_command('plans')}"
            )
        if spec.configuration not in plans.get("configurations", {}):
            raise SiteError(
                f"{spec.name}: {plans_file} has no configuration {spec.configuration!r} "
                f"(it has {sorted(plans.get('configurations', {}))}); set run-config 'configuration'"
            )
        for name, what in (("dataset.json", "plans"), ("dataset_fingerprint.json", "fingerprint")):
            if not (folder / name).is_file():
                raise SiteError(f"{spec.name}: {folder / name} not found; run {spec.fix_command(what)}")
        identifier = plans["configurations"][spec.configuration].get("data_identifier", "")
        data = folder / identifier
        if not identifier or not data.is_dir() or not any(data.iterdir()):
            raise SiteError(f"{spec.name}: {data} holds no preprocessed cases; run {spec.fix_command('preprocess')}")
        return plans

    # ---------------------------------------------------------------- trainer
    @property
    def network(self) -> nn.Module:
        """The live network (unwrapped from ``torch.compile``)."""
        return _unwrapped(self.trainer.network)

    @property
    def alias_map(self) -> AliasMap:
        """Alias groups of the live network."""
        if self._alias_map is None:
            self._alias_map = AliasMap.from_module(self.network)
        return self._alias_map

    def canonical(self) -> OrderedDict[str, torch.Tensor]:
        """The live network's canonical tensors (views of its parameters and buffers)."""
        return self.alias_map.collapse(self.network.state_dict())

    def start(self, options: TrainOptions, plans: dict | None = None) -> None:
        """Build the trainer if there is none: from the state file (rounds after the first) or fresh."""
        if self.trainer is not None:
            return
        plans = plans if plans is not None else self.check()
        resume = options.server_round > 1 and self.spec.state_file.is_file()
        self.trainer = self._build_trainer(plans, resume)
        self._data_loaders_ready = False
        self._alias_map = None
        self._set_schedule(max(options.num_epochs, 1))
        self.trainer.initialize()
        if resume:
            self._state_token = self._disk_state_token()
            self._load_state()
            log(
                INFO,
                "%s: trainer rebuilt from %s at epoch %d",
                self.spec.name,
                self.spec.state_file,
                self.trainer.current_epoch,
            )

    def _load_state(self) -> None:
        """Restore the new trainer from the state file, read with the safe loader (``weights_only=True``).

        Raises
        ------
        SiteError
            If the file cannot be read safely or is not a usable round state; the trainer is dropped.
        """
        path = self.spec.state_file
        try:
            restore_trainer(self.trainer, load_checkpoint(path))
        except (CheckpointError, ValueError, KeyError, TypeError, RuntimeError) as error:
            self.trainer = None
            raise SiteError(
                f"{self.spec.name}: the site's round state {path} is refused ({error}); it was not written by this "
                "site, or is damaged: remove it (and flwr_site_state.json) to start this site from the global model "
                "with a fresh optimizer"
            ) from None

    def _build_trainer(self, plans: dict, resume: bool) -> Any:
        spec = self.spec
        try:
            cls = trainer_class(spec.trainer)
        except ValueError as error:
            raise SiteError(f"{spec.name}: {error}; set run-config 'trainer'") from None
        dataset_json = json.loads((spec.dataset_folder / "dataset.json").read_text())
        plans = {**json.loads(json.dumps(plans)), "continue_training": resume}
        with nnunet_environment(preprocessed=spec.nnunet_preprocessed, results=spec.nnunet_results):
            trainer = cls(
                plans=plans,
                configuration=spec.configuration,
                fold=spec.fold,
                dataset_json=dataset_json,
                device=spec.torch_device(),
            )
        return trainer

    def _set_schedule(self, num_epochs: int) -> None:
        trainer = self.trainer
        trainer.num_epochs = num_epochs
        if trainer.lr_scheduler is not None and hasattr(trainer.lr_scheduler, "max_steps"):
            trainer.lr_scheduler.max_steps = num_epochs

    def load_global_(
        self,
        received: Mapping[str, torch.Tensor],
        local_keys: Collection[str] = (),
        alias_map_json: str | None = None,
    ) -> None:
        """Copy the server's canonical tensors into the live network, in place.

        Parameters
        ----------
        received
            Canonical key -> tensor for every group except ``local_keys``.
        local_keys
            Canonical keys this site keeps its own values for (the strategy's personalised groups).
        alias_map_json
            The server's alias map (``config["alias-map"]``, :meth:`AliasMap.to_json`); when given, it must
            equal this site's network's (see :meth:`check_alias_map`) before any weight is touched.

        Raises
        ------
        SiteError
            If the alias map, keys or shapes differ from this site's network.
        """
        if alias_map_json is not None:
            self.check_alias_map(alias_map_json)
        canonical = self.canonical()
        local = set(local_keys)
        shared = OrderedDict((key, tensor) for key, tensor in canonical.items() if key not in local)
        try:
            KeyMismatchError.check(received, shared, what="the server's model", against="this site's network", fix="")
            assign_(shared, received)
        except (KeyError, ValueError) as error:
            raise SiteError(
                f"{self.spec.name}: the server's model does not fit this site's network ({error}); "
                "the server and the sites must use the same plans, configuration and trainer"
            ) from None

    def check_alias_map(self, alias_map_json: str | bytes) -> None:
        """Refuse a server whose alias map (groups and key order) differs from this site's network's.

        Raises
        ------
        SiteError
            Naming the first differing group and the fix: the same plans and trainer class on both sides.
        """
        name = self.spec.name
        try:
            theirs = AliasMap.from_json(alias_map_json)
        except ValueError as error:
            raise SiteError(f"{name}: the server's 'alias-map' cannot be read ({error})") from None
        difference = self.alias_map.difference(theirs, names=("this site's network", "the server's"))
        if difference is not None:
            raise SiteError(
                f"{name}: the server's alias map differs from this site's network ({difference}); the server and "
                f"the sites must build the network from the same plans AND the same trainer class (this site uses "
                f"run-config 'trainer' = {self.spec.trainer!r}; e.g. nnUNetTrainerBN has BatchNorm buffers that "
                "nnUNetTrainer lacks)"
            )

    def _receive(
        self,
        received: Mapping[str, torch.Tensor],
        options: TrainOptions,
        plans_sha: str | None,
        local_keys: Collection[str],
        alias_map_json: str | None = None,
        *,
        fresh: bool,
    ) -> None:
        """Check the instruction and the site, have a trainer (a new one when ``fresh``), load the server's tensors.

        Nothing of the live trainer changes unless every check passes: a non-finite
        model is refused first, and keys, shapes and the alias map are checked before
        any weight is written; a fresh trainer replaces the live one only once loaded.
        """
        bad = first_non_finite(received)
        if bad is not None:
            raise SiteError(
                f"{self.spec.name}: the server's model is not finite ({bad!r} holds NaN or Inf); the round is refused "
                "and this site's trainer and state are left as they were"
            )
        plans = self.check(plans_sha)
        previous = (self.trainer, self._data_loaders_ready, self._alias_map, self._state_token)
        if fresh:
            self.trainer = None
        try:
            self.start(options, plans)
            self.load_global_(received, local_keys, alias_map_json)
        except BaseException:
            if fresh:
                self.trainer, self._data_loaders_ready, self._alias_map, self._state_token = previous
            raise

    def _drop_stale_trainer(self) -> None:
        """Forget the live trainer if another process (another simulation actor) trained this site since."""
        if self.trainer is not None and self._disk_state_token() not in (None, self._state_token):
            log(
                INFO,
                "%s: %s is newer than this process's trainer; rebuilding from it",
                self.spec.name,
                self.spec.state_file,
            )
            self.trainer = None

    def _disk_state_token(self) -> str | None:
        path = self.spec.state_token_file
        return str(json.loads(path.read_text())["token"]) if path.is_file() else None

    # --------------------------------------------------------------- training
    def _prepare_training(self, options: TrainOptions) -> None:
        trainer = self.trainer
        if options.iterations_per_epoch is not None:
            trainer.num_iterations_per_epoch = options.iterations_per_epoch
        if options.val_iterations_per_epoch is not None:
            trainer.num_val_iterations_per_epoch = options.val_iterations_per_epoch
        needed = trainer.current_epoch + options.local_epochs
        self._set_schedule(max(options.num_epochs, needed))
        if not self._data_loaders_ready:
            with _cpu_worker_defaults(trainer.device):
                trainer.on_train_start()
            self._data_loaders_ready = True

    def _run_epoch(self) -> None:
        """One nnU-Net epoch through the trainer's own hooks (FedProx term only on the training steps)."""
        trainer = self.trainer
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
                trainer.validation_step(next(trainer.dataloader_val))
                for _ in range(trainer.num_val_iterations_per_epoch)
            ]
            trainer.on_validation_epoch_end(outputs)
        trainer.loss = loss
        trainer.on_epoch_end()

    def train(
        self,
        received: Mapping[str, torch.Tensor],
        options: TrainOptions,
        plans_sha: str | None = None,
        local_keys: Collection[str] = (),
        alias_map_json: str | None = None,
    ) -> tuple[OrderedDict[str, torch.Tensor], dict[str, float | int | list[float]]]:
        """One round: load the global tensors, train ``options.local_epochs`` epochs, save the round state.

        Parameters
        ----------
        received
            The server's canonical tensors (see :meth:`load_global_`).
        options
            The round's training options.
        plans_sha
            The server's ``plans-sha256``; the round is refused if the site's plans differ.
        local_keys
            Canonical keys kept local (neither loaded nor returned).
        alias_map_json
            The server's ``alias-map``; the round is refused if it differs from this site's network's.

        Returns
        -------
        (canonical tensors, metrics)
            The network's canonical tensors for the keys of ``received`` (views of its parameters) and
            ``num-examples`` (training
            cases), ``train-loss``, ``val-loss``, ``pseudo-dice`` (mean foreground) and
            ``pseudo-dice-per-class`` of the round's last epoch.
        """
        self._drop_stale_trainer()
        self.agree_on_round(options.server_round)
        self._receive(received, options, plans_sha, local_keys, alias_map_json, fresh=options.server_round == 1)
        self._prepare_training(options)
        if options.seed is not None:
            _seed_everything(options.seed, options.server_round, self.spec.name)
        trainer = self.trainer
        if options.proximal_mu > 0:
            trainer.loss = ProximalLoss(trainer.loss, dict(self.network.named_parameters()), options.proximal_mu)
        try:
            with _progress_plot_once(trainer):
                for _ in range(options.local_epochs):
                    self._run_epoch()
        finally:
            if isinstance(trainer.loss, ProximalLoss):
                trainer.loss = trainer.loss.loss
        try:
            self.save_state(options.server_round)
        except SiteError:
            self.trainer = None  # diverged: the next round rebuilds from the previous round's state file
            raise
        logger = trainer.logger
        metrics = {
            "num-examples": len(self.split()[0]),
            "train-loss": _finite(logger.get_value("train_losses", step=-1)),
            "val-loss": _finite(logger.get_value("val_losses", step=-1)),
            "pseudo-dice": _finite(logger.get_value("mean_fg_dice", step=-1)),
            "pseudo-dice-per-class": [_finite(d) for d in logger.get_value("dice_per_class_or_region", step=-1)],
            "epoch": int(trainer.current_epoch),
            "learning-rate": float(trainer.optimizer.param_groups[0]["lr"]),
        }
        log(
            INFO,
            "%s: round %d trained %d epoch(s) (epoch %d/%d), train loss %.4f, pseudo-Dice %.4f",
            self.spec.name,
            options.server_round,
            options.local_epochs,
            trainer.current_epoch,
            trainer.num_epochs,
            metrics["train-loss"],
            metrics["pseudo-dice"],
        )
        canonical = self.canonical()
        return OrderedDict((key, canonical[key]) for key in received), metrics

    def save_state(self, server_round: int | None = None) -> Path:
        """Write the round state (:func:`trainer_state`), atomically, once it is finite and reads back safely.

        With ``server_round``, the state is also kept as the state after that round (:func:`round_state_file`,
        a hard link: no copy), for :data:`KEPT_ROUNDS` rounds, and the token records the round.

        Raises
        ------
        SiteError
            If the network or the optimizer state holds NaN or Inf; the previous state file is kept.
        """
        trainer = self.trainer
        state = trainer_state(trainer)
        bad = _first_non_finite_state(state["network_weights"], state["optimizer_state"])
        if bad is not None:
            raise SiteError(
                f"{self.spec.name}: training went non-finite ({bad!r} holds NaN or Inf); the round is refused and "
                f"the previous round state {self.spec.state_file} is kept"
            )
        atomic_save(state, self.spec.state_file, check=load_checkpoint)  # refuse a file the safe loader cannot read
        self._write_token(int(trainer.current_epoch), server_round)
        if server_round is not None:
            _keep_round_state(self.spec, server_round)
        return self.spec.state_file

    def _write_token(self, epoch: int, server_round: int | None) -> None:
        self._state_token = uuid.uuid4().hex
        entries = {"token": self._state_token, "epoch": epoch}
        if server_round is not None:
            entries["round"] = server_round
        token = json.dumps(entries).encode()
        atomic_write(self.spec.state_token_file, lambda file: file.write(token))

    def agree_on_round(self, server_round: int) -> None:
        """Before training ``server_round``: if this site has trained that round already (the server resumed from
        an earlier checkpoint, e.g. after it was killed), go back to its state after round ``server_round - 1``,
        so every round is trained once and the learning-rate schedule is the uninterrupted one.

        Raises
        ------
        SiteError
            If that state is no longer kept (the server resumed from more than :data:`KEPT_ROUNDS` rounds back).
        """
        token = self.spec.state_token_file
        saved = json.loads(token.read_text()).get("round") if token.is_file() else None
        if not isinstance(saved, int) or saved < server_round:
            return
        target = server_round - 1
        self.trainer = None
        if target > 0:
            source = round_state_file(self.spec, target)
            if not source.is_file():
                raise SiteError(
                    f"{self.spec.name}: the server sends round {server_round}, which this site trained already (its "
                    f"state is at round {saved}), but the state after round {target} ({source}) is no longer kept; "
                    "resume the server from a later checkpoint, or remove this site's flwr_site_state.* files to "
                    "start it from the global model with a fresh optimizer"
                )
            _link_or_copy(source, self.spec.state_file)
            self._write_token(int(load_checkpoint(source)["current_epoch"]), target)
        log(
            INFO,
            "%s: round %d again (the server resumed): rolled back from the state after round %d to the one after "
            "round %d",
            self.spec.name,
            server_round,
            saved,
            target,
        )

    def split(self) -> tuple[list[str], list[str]]:
        """(training, validation) case identifiers of the site's fold."""
        with nnunet_environment(preprocessed=self.spec.nnunet_preprocessed, results=self.spec.nnunet_results):
            train, validation = self.trainer.do_split()
        return list(train), list(validation)

    # ------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(
        self,
        received: Mapping[str, torch.Tensor],
        options: TrainOptions,
        plans_sha: str | None = None,
        local_keys: Collection[str] = (),
        alias_map_json: str | None = None,
    ) -> dict[str, float | int | list[float]]:
        """Dice of the global model on the site's validation cases (whole cases, sliding window, preprocessed space).

        Parameters are those of :meth:`train`. Returns ``num-examples`` (validation cases), ``dice`` (the
        mean over foreground labels of the Dice from voxel counts summed over the cases) and ``dice-per-class``.
        """
        self._receive(received, options, plans_sha, local_keys, alias_map_json, fresh=False)
        trainer = self.trainer
        validation = self.split()[1]
        if not validation:
            raise SiteError(f"{self.spec.name}: fold {self.spec.fold} has no validation cases; set run-config 'fold'")
        labels = trainer.label_manager
        if labels.has_regions:
            raise SiteError(f"{self.spec.name}: evaluation of region-based training is not supported")
        foreground = list(labels.foreground_labels)
        counts = np.zeros((len(foreground), 3))
        predictor = self._predictor()
        dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, validation)
        trainer.set_deep_supervision_enabled(False)
        try:
            for case in validation:
                data, seg, _, _ = dataset.load_case(case)
                logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(np.ascontiguousarray(data[:])))
                predicted = logits.argmax(0).cpu().numpy()
                truth = np.asarray(seg[:])[0]
                for index, label in enumerate(foreground):
                    counts[index] += voxel_counts(truth, predicted, label)
        finally:
            trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
        per_class = [dice_from_counts(*count) for count in counts]
        dice = float(np.mean(per_class))
        log(INFO, "%s: global model Dice %.4f on %d validation case(s)", self.spec.name, dice, len(validation))
        return {"num-examples": len(validation), "dice": dice, "dice-per-class": per_class}

    def _predictor(self) -> Any:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        trainer = self.trainer
        if trainer.inference_allowed_mirroring_axes is None:
            trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        predictor = nnUNetPredictor(
            tile_step_size=0.5,
            use_gaussian=True,
            use_mirroring=trainer.inference_allowed_mirroring_axes is not None,
            perform_everything_on_device=trainer.device.type == "cuda",
            device=trainer.device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        predictor.manual_initialization(
            self.network,
            trainer.plans_manager,
            trainer.configuration_manager,
            None,
            trainer.dataset_json,
            type(trainer).__name__,
            trainer.inference_allowed_mirroring_axes,
        )
        self.network.eval()
        return predictor
