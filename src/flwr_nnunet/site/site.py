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
fresh process per message) the trainer is rebuilt from the site's state file
(:mod:`flwr_nnunet.site.trainer_state`, written after every round), and a round
the site trained already goes back to its state after the round before
(:meth:`Site.agree_on_round`). Evaluation is :mod:`flwr_nnunet.site.evaluation`.

A site validates a whole instruction before it touches its trainer: a
non-finite global model, keys or shapes that do not fit its network, or a
mismatching alias map are refused, and a round whose training ends non-finite
is refused without writing the state file, so the previous round's state stays.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import replace
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.supercore import log
from torch import nn

from flwr_nnunet.core.aliasing import AliasMap
from flwr_nnunet.core.reduce import assign_, check_updates
from flwr_nnunet.errors import KeyMismatchError
from flwr_nnunet.nnunet.checkpoint_io import remove_orphan_temp_files
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.nnunet.memory_fit import iterations_scale
from flwr_nnunet.nnunet.planning import nnunet_environment
from flwr_nnunet.site.crossval_validation import validate_fold
from flwr_nnunet.site.evaluation import validation_dice
from flwr_nnunet.site.fedprox import ProximalLoss
from flwr_nnunet.site.marginal_loss import marginal_loss_for_partial_labels
from flwr_nnunet.site.personal import FineTuneSchedule, save_personal_model
from flwr_nnunet.site.runtime import (
    build_trainer,
    cpu_worker_defaults,
    epoch_metrics,
    progress_plot_once,
    run_epoch,
    seed_everything,
    set_schedule,
)
from flwr_nnunet.site.spec import SiteError, SiteSpec, TrainOptions
from flwr_nnunet.site.trainer_state import (
    disk_token,
    first_non_finite,
    load_state,
    roll_back,
    save_state,
    trained_round,
    unwrapped,
)

__all__ = ["Site"]


def _copies(tensors: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Detached copies of ``tensors``."""
    return OrderedDict((key, tensor.detach().clone()) for key, tensor in tensors.items())


def _personal_metrics(metrics: Mapping[str, object]) -> dict[str, object]:
    """A personal model's ``dice`` and ``dice-per-class`` as ``personal-dice`` and ``personal-dice-per-class``."""
    return {"personal-dice": metrics["dice"], "personal-dice-per-class": metrics["dice-per-class"]}


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
        self._iterations_scale = 1

    # ----------------------------------------------------------------- checks
    def check(self, plans_sha: str | None = None) -> dict:
        """The site's plans, after checking the dataset is there, preprocessed and planned like the server's.

        The plans returned carry this site's own ``dataset_name`` (``spec.dataset``), from which nnU-Net's
        trainer derives the site's folders: a plain copy of the federation's plans file holds the
        federation's name, and the plans digest leaves the name out.

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
                f"root, name the site's own dataset folder with node-config 'dataset' (deployment), or plan and "
                f"preprocess the dataset: {spec.fix_command('plans')}"
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
        return {**plans, "dataset_name": spec.dataset}

    # ---------------------------------------------------------------- trainer
    @property
    def network(self) -> nn.Module:
        """The live network (unwrapped from ``torch.compile``)."""
        return unwrapped(self.trainer.network)

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
        for orphan in remove_orphan_temp_files(self.spec.output_folder):
            log(INFO, "%s: removed %s, left by a site process killed while it wrote", self.spec.name, orphan)
        plans = plans if plans is not None else self.check()
        resume = options.server_round > 1 and self.spec.state_file.is_file()
        self.trainer = build_trainer(self.spec, plans, resume)
        self._iterations_scale = iterations_scale(plans, self.spec.configuration, self.spec.batch_size)
        self.trainer.num_iterations_per_epoch *= self._iterations_scale
        self._data_loaders_ready = False
        self._alias_map = None
        set_schedule(self.trainer, max(options.num_epochs, 1))
        self.trainer.initialize()
        marginal_loss_for_partial_labels(self.spec, self.trainer)
        if resume:
            self._state_token = disk_token(self.spec)
            try:
                load_state(self.spec, self.trainer)
            except SiteError:
                self.trainer = None
                raise
            log(
                INFO,
                "%s: trainer rebuilt from %s at epoch %d",
                self.spec.name,
                self.spec.state_file,
                self.trainer.current_epoch,
            )

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
        assign_(self.check_global(received, local_keys, alias_map_json), received)

    def check_global(
        self,
        received: Mapping[str, torch.Tensor],
        local_keys: Collection[str] = (),
        alias_map_json: str | None = None,
    ) -> OrderedDict[str, torch.Tensor]:
        """The live network's canonical tensors that ``received`` fits (its keys, shapes), after the checks of
        :meth:`load_global_`; nothing is written.

        Raises
        ------
        SiteError
            If the alias map, keys or shapes differ from this site's network.
        """
        if alias_map_json is not None:
            self.check_alias_map(alias_map_json)
        local = set(local_keys)
        shared = OrderedDict((key, tensor) for key, tensor in self.canonical().items() if key not in local)
        try:
            KeyMismatchError.check(received, shared, what="the server's model", against="this site's network", fix="")
            check_updates(shared, [received])
        except (KeyError, ValueError) as error:
            raise SiteError(
                f"{self.spec.name}: the server's model does not fit this site's network ({error}); "
                "the server and the sites must use the same plans, configuration and trainer"
            ) from None
        return shared

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
        load: bool = True,
    ) -> None:
        """Check the instruction and the site, have a trainer (a new one when ``fresh``), load the server's tensors
        (with ``load``; else only check that they fit).

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
            if load:
                self.load_global_(received, local_keys, alias_map_json)
            else:
                self.check_global(received, local_keys, alias_map_json)
        except BaseException:
            if fresh:
                self.trainer, self._data_loaders_ready, self._alias_map, self._state_token = previous
            raise

    def _drop_stale_trainer(self) -> None:
        """Forget the live trainer if another process (another simulation actor) trained this site since."""
        if self.trainer is not None and disk_token(self.spec) not in (None, self._state_token):
            log(
                INFO,
                "%s: %s is newer than this process's trainer; rebuilding from it",
                self.spec.name,
                self.spec.state_file,
            )
            self.trainer = None

    # --------------------------------------------------------------- training
    def _prepare_training(self, options: TrainOptions) -> None:
        trainer = self.trainer
        if options.iterations_per_epoch is not None:  # a smaller batch runs more: its epoch sees as many patches
            trainer.num_iterations_per_epoch = options.iterations_per_epoch * self._iterations_scale
        if options.val_iterations_per_epoch is not None:
            trainer.num_val_iterations_per_epoch = options.val_iterations_per_epoch
        needed = trainer.current_epoch + options.local_epochs
        set_schedule(trainer, max(options.num_epochs, needed))
        if not self._data_loaders_ready:
            with cpu_worker_defaults(trainer.device):
                trainer.on_train_start()
            self._data_loaders_ready = True

    def _run_epoch(self) -> None:
        """One epoch of the live trainer (:func:`~flwr_nnunet.site.runtime.run_epoch`)."""
        run_epoch(self.trainer)

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

        With ``options.mr_mtl_mu`` set (MR-MTL), the network is the site's personal model: from round 2 on the
        global tensors are checked but not loaded, and they anchor the proximal term instead.

        Returns
        -------
        (canonical tensors, metrics)
            The network's canonical tensors for the keys of ``received`` (views of its parameters), and
            ``num-examples`` (training cases) with :func:`~flwr_nnunet.site.runtime.epoch_metrics` of the
            round's last epoch.
        """
        self._drop_stale_trainer()
        fresh = options.server_round == 1
        load = fresh or options.mr_mtl_mu is None  # MR-MTL keeps the personal model from round 2 on
        self._receive(received, options, plans_sha, local_keys, alias_map_json, fresh=fresh, load=load)
        if self.agree_on_round(options.server_round):  # the instruction is valid: now the state may go back
            self._receive(received, options, plans_sha, local_keys, alias_map_json, fresh=fresh, load=load)
        self._prepare_training(options)
        if options.seed is not None:
            seed_everything(options.seed, options.server_round, self.spec.name)
        trainer = self.trainer
        parameters = dict(self.network.named_parameters())
        if options.mr_mtl_mu:
            trainer.loss = ProximalLoss(trainer.loss, parameters, options.mr_mtl_mu, anchors=received)
        elif options.proximal_mu > 0:
            trainer.loss = ProximalLoss(trainer.loss, parameters, options.proximal_mu)
        try:
            with progress_plot_once(trainer):
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
        metrics = {"num-examples": len(self.split()[0]), **epoch_metrics(trainer)}
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
        """Write the round state (:func:`~flwr_nnunet.site.trainer_state.save_state`) and remember its token.

        Raises
        ------
        SiteError
            If the network or the optimizer state holds NaN or Inf; the previous state file is kept.
        """
        self._state_token = save_state(self.spec, self.trainer, server_round)
        return self.spec.state_file

    def agree_on_round(self, server_round: int) -> bool:
        """Before training ``server_round``: if this site has trained that round already (the server resumed from
        an earlier checkpoint, e.g. after it was killed), drop the trainer and go back to the state after round
        ``server_round - 1`` (:func:`~flwr_nnunet.site.trainer_state.roll_back`), so every round is trained once
        and the learning-rate schedule is the uninterrupted one. Returns whether it went back (then the
        trainer must be rebuilt and the server's tensors loaded again). :meth:`train` calls it only once the
        instruction has passed every check, so a malformed instruction never moves the state back.

        Raises
        ------
        SiteError
            If that state is no longer kept (the server resumed from more than
            :data:`~flwr_nnunet.site.trainer_state.KEPT_ROUNDS` rounds back).
        """
        saved = trained_round(self.spec)
        if saved is None or saved < server_round:
            return False
        self.trainer = None
        token = roll_back(self.spec, server_round, saved)
        if token is not None:
            self._state_token = token
        return True

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

        Parameters are those of :meth:`train`. Returns
        :func:`~flwr_nnunet.site.evaluation.validation_dice`'s ``num-examples``, ``dice``, ``dice-per-class`` and
        ``label-confusion``. With MR-MTL (``options.mr_mtl_mu`` set) the site's personal model is evaluated too
        (``personal-dice``, ``personal-dice-per-class``), written as the site's personal model
        (:func:`~flwr_nnunet.site.personal.save_personal_model`) and kept live: the global model is loaded only
        for its own evaluation. With ``options.fine_tune_epochs`` the site fine-tunes the global model into its
        personal model after the run (see :meth:`_fine_tune`).
        """
        mr_mtl = options.mr_mtl_mu is not None and not options.fine_tune_epochs
        self._receive(received, options, plans_sha, local_keys, alias_map_json, fresh=False, load=not mr_mtl)
        validation = self.split()[1]
        if options.fine_tune_epochs:
            return self._fine_tune(received, options, local_keys, validation)
        if not mr_mtl:
            return validation_dice(self.spec, self.trainer, self.network, validation)
        personal = validation_dice(self.spec, self.trainer, self.network, validation, "personal model")
        kept = _copies(self.canonical())
        self.load_global_(received, local_keys)
        try:
            metrics = validation_dice(self.spec, self.trainer, self.network, validation)
        finally:
            assign_(self.canonical(), kept)
        about = {"kind": "mr-mtl", "server_round": options.server_round, "validation_dice": personal["dice"]}
        save_personal_model(self.spec, self.trainer, {**about, "global_validation_dice": metrics["dice"]})
        return {**metrics, **_personal_metrics(personal)}

    def crossval_validate(
        self,
        received: Mapping[str, torch.Tensor],
        options: TrainOptions,
        plans_sha: str | None = None,
        local_keys: Collection[str] = (),
        alias_map_json: str | None = None,
        *,
        fold: int,
    ) -> dict[str, dict[str, Any]]:
        """After a cross-validation fold's last round: nnU-Net's whole-case validation of the fold's global model.

        Loads the global model (parameters as for :meth:`train`) and runs
        :func:`~flwr_nnunet.site.crossval_validation.validate_fold` on this site's validation cases of ``fold``:
        the predictions and nnU-Net's ``summary.json`` stay at the site (``<fold folder>/validation``); returned
        are the per-case counts only. The round state on disk is not changed: the trainer is dropped afterwards.

        Raises
        ------
        SiteError
            If this site does not train ``fold`` (node-config 'fold' differs, or 'all'), before anything is loaded.
        """
        if str(self.spec.fold) != str(fold) or self.spec.fold == "all":
            raise SiteError(
                f"{self.spec.name}: the server validates cross-validation fold {fold}, but this site trains fold "
                f"{self.spec.fold!r} (node-config 'fold' or run-config 'fold'): every site must train the fold the "
                "run names"
            )
        self._receive(received, options, plans_sha, local_keys, alias_map_json, fresh=False)
        try:
            return validate_fold(self.spec, self.trainer, self.network)
        finally:
            self.trainer = None  # the round state on disk stays the site's state

    def _fine_tune(
        self, received: Mapping[str, torch.Tensor], options: TrainOptions, local_keys: Collection[str], validation: list
    ) -> dict[str, float | int | list[float]]:
        """After the run (the global model loaded): fine-tune it for ``options.fine_tune_epochs`` epochs on this
        site's training cases, and keep it as the site's personal model only if its validation Dice is higher than
        the global model's; otherwise the global model is the personal model. Either is written with
        :func:`~flwr_nnunet.site.personal.save_personal_model`; nothing is sent but metrics.

        Fine-tuning starts from a fresh SGD optimizer (nnU-Net's) whose learning rate decays from the trainer's
        ``initial_lr`` over the fine-tuning epochs (:class:`~flwr_nnunet.site.personal.FineTuneSchedule`).
        The round state on disk is not changed: the trainer is dropped afterwards.

        Returns
        -------
        dict
            The global model's :meth:`evaluate` metrics, plus ``personal-dice`` and ``personal-dice-per-class`` of
            the model kept and ``fine-tune-kept`` (1: the fine-tuned model, 0: the global model).
        """
        try:
            metrics = validation_dice(self.spec, self.trainer, self.network, validation)
            self._fine_tune_epochs(options)
            tuned = validation_dice(self.spec, self.trainer, self.network, validation, "fine-tuned model")
            kept = tuned["dice"] > metrics["dice"]
            if not kept:
                self.load_global_(received, local_keys)
            about = {
                "kind": "fine-tuned" if kept else "global",
                "server_round": options.server_round,
                "validation_dice": tuned["dice"] if kept else metrics["dice"],
                "global_validation_dice": metrics["dice"],
                "fine_tuned_validation_dice": tuned["dice"],
                "fine_tune_epochs": options.fine_tune_epochs,
            }
            save_personal_model(self.spec, self.trainer, about)
        finally:
            self.trainer = None  # the round state on disk stays the site's state
        log(
            INFO,
            "%s: personal model: %s (validation Dice fine-tuned %.4f, global %.4f)",
            self.spec.name,
            "the fine-tuned model" if kept else "the global model, kept",
            tuned["dice"],
            metrics["dice"],
        )
        return {**metrics, **_personal_metrics(tuned if kept else metrics), "fine-tune-kept": int(kept)}

    def _fine_tune_epochs(self, options: TrainOptions) -> None:
        """``options.fine_tune_epochs`` epochs of the live trainer with a fresh optimizer and its own schedule."""
        trainer = self.trainer
        self._prepare_training(replace(options, local_epochs=options.fine_tune_epochs))
        trainer.optimizer, _ = trainer.configure_optimizers()
        trainer.lr_scheduler = FineTuneSchedule(
            trainer.optimizer, trainer.initial_lr, trainer.current_epoch, options.fine_tune_epochs
        )
        if options.seed is not None:
            seed_everything(options.seed, options.server_round + 1, self.spec.name)
        with torch.enable_grad(), progress_plot_once(trainer):
            for _ in range(options.fine_tune_epochs):
                self._run_epoch()
