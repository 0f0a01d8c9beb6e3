"""One hospital of the federation: an nnU-Net trainer on the site's own preprocessed data.

A :class:`Site` keeps one nnU-Net trainer (``nnUNetTrainer`` or any trainer
class named by the run config) alive across rounds. Each round it loads the
global canonical tensors into the live network *in place* (the optimizer keeps
its references and momentum), trains the configured local epochs with nnU-Net's
own epoch hooks, and returns the network's canonical tensors with its metrics.

The learning-rate schedule (nnU-Net's PolyLR) runs over the whole federation:
``num_epochs`` is the federation's total (rounds x local epochs) and the
epoch counter keeps counting across rounds, never past the end.

A message takes one way through the site: the instruction (a finite global model, the
site's plans), then the site's state (:func:`~flwr_nnunet.site.trainer_state.round_start`:
the live trainer, the round state file, or the state after the round before for a round
the site trained already), then its trainer (built or kept, the global model checked and
loaded, the round trained), then the reply (the round state saved, the metrics). Where the
process does not survive between rounds (a Flower SuperNode starts a fresh process per
message) the trainer is rebuilt from the site's state file
(:mod:`flwr_nnunet.site.trainer_state`, written after every round). Evaluation is
:mod:`flwr_nnunet.site.evaluation`.

A site validates a whole instruction before it touches its trainer: a
non-finite global model, keys or shapes that do not fit its network, or a
mismatching alias map are refused with the live trainer and the state on disk
as they were, and a round whose training ends non-finite is refused without
writing the state file, so the previous round's state stays.
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
from flwr_nnunet.site.request import SiteAnswer, SiteRequest
from flwr_nnunet.site.runtime import (
    PlotLater,
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
    RoundStart,
    disk_token,
    first_non_finite,
    load_state,
    round_start,
    save_state,
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
    plot_later
        Where given, a round hands it the drawing of nnU-Net's ``progress.png`` instead of drawing it itself (the
        warm worker draws it once it has replied).

    Notes
    -----
    The trainer is built on first use: from the state file when one exists and
    the round is not the first, otherwise fresh. Call :meth:`check` first to get
    clear errors for a missing or unprepared dataset.
    """

    def __init__(self, spec: SiteSpec, *, plot_later: PlotLater | None = None):
        self.spec = spec
        self._plot_later = plot_later
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
        resume = options.server_round > 1 and self.spec.state_file.is_file()
        self._build(options, plans if plans is not None else self.check(), self.spec.state_file if resume else None)

    def _build(self, options: TrainOptions, plans: dict, state_file: Path | None) -> None:
        """A new live trainer on ``plans``: restored from ``state_file`` (a round state), else fresh.

        Raises
        ------
        SiteError
            If the trainer cannot be built or the round state is refused; the live trainer is then unchanged.
        """
        for orphan in remove_orphan_temp_files(self.spec.output_folder):
            log(INFO, "%s: removed %s, left by a site process killed while it wrote", self.spec.name, orphan)
        trainer = build_trainer(self.spec, plans, state_file is not None)
        scale = iterations_scale(plans, self.spec.configuration, self.spec.batch_size)
        trainer.num_iterations_per_epoch *= scale
        set_schedule(trainer, max(options.num_epochs, 1))
        trainer.initialize()
        marginal_loss_for_partial_labels(self.spec, trainer)
        token = None
        if state_file is not None:
            token = disk_token(self.spec) if state_file == self.spec.state_file else None
            load_state(self.spec, trainer, state_file)
            log(INFO, "%s: trainer rebuilt from %s at epoch %d", self.spec.name, state_file, trainer.current_epoch)
        self.trainer, self._iterations_scale, self._state_token = trainer, scale, token
        self._data_loaders_ready, self._alias_map = False, None

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
        training: bool,
        load: bool = True,
    ) -> None:
        """The instruction, then the site's state, then its trainer: check the server's model and the site's plans,
        find where the message starts (:func:`~flwr_nnunet.site.trainer_state.round_start`), have that trainer and
        load the server's tensors (with ``load``; else only check that they fit).

        Nothing of the live trainer or the state on disk changes unless every check passes: a non-finite model is
        refused first, and keys, shapes and the alias map are checked before any weight is written; a rebuilt
        trainer replaces the live one only once loaded.
        """
        bad = first_non_finite(received)
        if bad is not None:
            raise SiteError(
                f"{self.spec.name}: the server's model is not finite ({bad!r} holds NaN or Inf); the round is refused "
                "and this site's trainer and state are left as they were"
            )
        plans = self.check(plans_sha)
        live = self.trainer is not None
        start = round_start(self.spec, options.server_round, self._state_token, live=live, training=training)
        self._take_trainer(start, options, plans, received, local_keys, alias_map_json, load=load)

    def _take_trainer(
        self,
        start: RoundStart,
        options: TrainOptions,
        plans: dict,
        received: Mapping[str, torch.Tensor],
        local_keys: Collection[str],
        alias_map_json: str | None,
        *,
        load: bool,
    ) -> None:
        """Have the trainer ``start`` names (the live one or a rebuilt one) with the server's tensors loaded (with
        ``load``; else only checked); the live trainer stays as it was when a check fails."""
        previous = (self.trainer, self._iterations_scale, self._state_token, self._data_loaders_ready, self._alias_map)
        try:
            if not start.keep_live:
                self._build(options, plans, start.state_file)
            if load:
                self.load_global_(received, local_keys, alias_map_json)
            else:
                self.check_global(received, local_keys, alias_map_json)
        except BaseException:
            self.trainer, self._iterations_scale, self._state_token, self._data_loaders_ready, self._alias_map = (
                previous
            )
            raise
        if start.rolled_back_from is not None:
            log(
                INFO,
                "%s: round %d again (the server resumed): rolled back from the state after round %d to the one after "
                "round %d",
                self.spec.name,
                options.server_round,
                start.rolled_back_from,
                options.server_round - 1,
            )

    def answer(self, request: SiteRequest) -> SiteAnswer:
        """Answer a checked instruction (:class:`~flwr_nnunet.site.request.SiteRequest`): :meth:`train` a round,
        :meth:`evaluate`, or :meth:`crossval_validate` a fold (its per-case counts as JSON text); with this site's
        plans digest."""
        args = (request.received, request.options, request.plans_sha, request.local_keys, request.alias_map_json)
        if request.kind == "train":
            tensors, metrics = self.train(*args)
            return SiteAnswer(metrics, plans_sha256(self.check()), tensors=tensors)
        if request.kind == "crossval":
            counts = self.crossval_validate(*args, fold=request.fold)
            text = json.dumps(counts, allow_nan=False)
            return SiteAnswer({"num-examples": len(counts)}, plans_sha256(self.check()), counts=text)
        return SiteAnswer(self.evaluate(*args), plans_sha256(self.check()))

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
        load = options.server_round == 1 or options.mr_mtl_mu is None  # MR-MTL keeps its personal model after round 1
        self._receive(received, options, plans_sha, local_keys, alias_map_json, training=True, load=load)
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
            with progress_plot_once(trainer, self._plot_later):
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
        for its own evaluation. With ``local_keys`` (FedBN's local norms) the global model with the site's own
        groups is written as the site's personal model. With ``options.fine_tune_epochs`` the site fine-tunes the
        global model into its personal model after the run (see :meth:`_fine_tune`).
        """
        mr_mtl = options.mr_mtl_mu is not None and not options.fine_tune_epochs
        self._receive(received, options, plans_sha, local_keys, alias_map_json, training=False, load=not mr_mtl)
        validation = self.split()[1]
        if options.fine_tune_epochs:
            return self._fine_tune(received, options, local_keys, validation)
        if not mr_mtl:
            metrics = validation_dice(self.spec, self.trainer, self.network, validation)
            if local_keys:  # the global model with the site's own local groups: the model this site predicts with
                about = {
                    "kind": "local-groups",
                    "server_round": options.server_round,
                    "validation_dice": metrics["dice"],
                }
                save_personal_model(self.spec, self.trainer, about)
            return metrics
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
        self._receive(received, options, plans_sha, local_keys, alias_map_json, training=False)
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
        with torch.enable_grad(), progress_plot_once(trainer, self._plot_later):
            for _ in range(options.fine_tune_epochs):
                self._run_epoch()
