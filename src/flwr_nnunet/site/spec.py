"""What a site is and what one round of its training does: folders, nnU-Net setup, round options."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

from flwr_nnunet.errors import FlwrNnUNetError

__all__ = [
    "DATASET_NAME",
    "DEFAULT_MAX_LOCAL_EPOCHS",
    "STATE_FILE",
    "STATE_TOKEN_FILE",
    "InstructionError",
    "SiteError",
    "SiteSpec",
    "TrainOptions",
    "checked_dataset_name",
    "find_site_dataset",
    "find_site_plans",
    "plans_files",
]

STATE_FILE = "flwr_site_state.pth"
"""Name of the per-site round state (an nnU-Net trainer checkpoint) in the trainer's fold folder."""

STATE_TOKEN_FILE = "flwr_site_state.json"
"""Beside the state: a fresh token per saved round, so a process can tell that another one trained since."""


DEFAULT_MAX_LOCAL_EPOCHS = 100
"""The most ``local-epochs`` a site trains in one round unless its node config says otherwise
(``flower-supernode --node-config "max-local-epochs=N"``)."""


class SiteError(FlwrNnUNetError, RuntimeError):
    """A site cannot take part in a round; the message says why and what fixes it."""


class InstructionError(SiteError, ValueError):
    """The server's instruction is malformed (a missing, mistyped or out-of-range entry); nothing was changed."""


_MISSING = object()


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _config_int(config: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    """``config[key]`` as an int (an integral float is accepted), ``default`` when absent.

    Raises
    ------
    InstructionError
        If the key is absent without a default, or its value is not an integer (bools are refused).
    """
    if key not in config:
        if default is _MISSING:
            raise InstructionError(f"the instruction's config has no {key!r}; the server must send it")
        return default
    value = config[key]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise InstructionError(f"config {key!r} must be an integer, got {_shown(value)}")


def _config_float(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InstructionError(f"config {key!r} must be a finite number, got {_shown(value)}")
    return float(value)


def _at_least(key: str, value: int, minimum: int) -> int:
    if value < minimum:
        raise InstructionError(f"config {key!r} must be at least {minimum}, got {value}")
    return value


DATASET_NAME = re.compile(r"Dataset(\d{3})_(\S+)")
"""The form of an nnU-Net dataset folder name: ``Dataset<3-digit ID>_<Name>``."""


def checked_dataset_name(value: Any, site: str) -> str:
    """``value`` when it is an nnU-Net dataset folder name (:data:`DATASET_NAME`): a node config's ``dataset``.

    Raises
    ------
    SiteError
        Naming ``site``, the value, the form and the fix.
    """
    if isinstance(value, str) and DATASET_NAME.fullmatch(value):
        return value
    raise SiteError(
        f"{site}: node-config 'dataset' must be an nnU-Net dataset folder name Dataset<3-digit ID>_<Name>, not "
        f"{_shown(value)}; start the SuperNode with --node-config \"dataset='Dataset517_Liver' ...\" naming this "
        "site's folder in its nnUNet_raw / nnUNet_preprocessed"
    )


def find_site_dataset(federation: str, roots: Sequence[Path], site: str) -> str:
    """This site's own dataset folder name, found in its roots (simulation: its nnUNet_raw and nnUNet_preprocessed).

    ``federation`` when a root holds a folder of that name; else the one
    ``Dataset<ID>_<Name>`` folder there whose ``<Name>`` is the federation's
    (``Dataset517_Liver`` for ``Dataset003_Liver``), else the only dataset
    folder there. With no dataset folder at all, ``federation`` (the site's
    checks then name what is missing).

    Raises
    ------
    SiteError
        If several folders fit, naming them and the fix.
    """
    if any((Path(root) / federation).is_dir() for root in roots):
        return federation
    found = sorted(
        {
            path.name
            for root in roots
            if Path(root).is_dir()
            for path in Path(root).iterdir()
            if path.is_dir() and DATASET_NAME.fullmatch(path.name)
        }
    )
    wanted = DATASET_NAME.fullmatch(federation)
    same = [name for name in found if wanted and DATASET_NAME.fullmatch(name).group(2) == wanted.group(2)]
    candidates = same or found
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        return federation
    folders = " or ".join(str(Path(root)) for root in roots)
    raise SiteError(
        f"{site}: the federation's dataset {federation} is not in {folders}, and several dataset folders there "
        f"could be this site's ({', '.join(candidates)}); rename this site's folder to {federation}, or remove "
        "the others"
    )


@dataclass(frozen=True)
class SiteSpec:
    """Where a site's data lives and which nnU-Net training it runs.

    Parameters
    ----------
    name
        Shown in logs and errors (e.g. ``site-0``).
    dataset
        This site's own dataset folder name ``Dataset<ID>_<Name>`` in its ``nnUNet_raw``,
        ``nnUNet_preprocessed`` and ``nnUNet_results`` (node config ``dataset``); it may differ from the
        federation's run-config ``dataset`` (``Dataset517_Liver`` here, ``Dataset003_Liver`` elsewhere).
    nnunet_preprocessed
        The site's ``nnUNet_preprocessed`` root (holds ``<dataset>/<plans>.json`` and the preprocessed cases).
    nnunet_results
        The site's ``nnUNet_results`` root: the trainer's logs and the round state go to
        ``<dataset>/<trainer>__<plans>__<configuration>/fold_<fold>/``.
    configuration
        nnU-Net configuration (``2d``, ``3d_fullres``, ...).
    plans
        Plans identifier (``nnUNetPlans``).
    trainer
        nnU-Net trainer class name (``nnUNetTrainer``, ``nnUNetTrainerBN``, ``nnUNetTrainerNoDeepSupervision``, ...);
        classes outside nnU-Net are found through ``nnUNet_extTrainer``.
    fold
        The split of ``splits_final.json`` whose ``train`` cases are trained on and whose ``val`` cases are
        evaluated (``"all"``: every case for both).
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    batch_size, patch_size
        A smaller batch, and patch, than the plans' for this site's GPU memory (node config ``batch-size``,
        ``patch-size``; None: as planned): :func:`~flwr_nnunet.nnunet.memory_fit.fit_to_memory`. The network,
        and so the aggregation, stays the federation's.
    """

    name: str
    dataset: str
    nnunet_preprocessed: Path
    nnunet_results: Path
    configuration: str = "2d"
    plans: str = "nnUNetPlans"
    trainer: str = "nnUNetTrainer"
    fold: int | str = 0
    device: str = "auto"
    batch_size: int | None = None
    patch_size: tuple[int, ...] | None = None

    @property
    def dataset_folder(self) -> Path:
        """``<nnunet_preprocessed>/<dataset>``."""
        return Path(self.nnunet_preprocessed) / self.dataset

    @property
    def output_folder(self) -> Path:
        """The trainer's fold folder, where the round state lives."""
        model = convert_trainer_plans_config_to_identifier(self.trainer, self.plans, self.configuration)
        return Path(self.nnunet_results) / self.dataset / model / f"fold_{self.fold}"

    @property
    def state_file(self) -> Path:
        """The round state written after every round."""
        return self.output_folder / STATE_FILE

    @property
    def state_token_file(self) -> Path:
        """The token of the newest round state."""
        return self.output_folder / STATE_TOKEN_FILE

    def fix_command(self, what: str) -> str:
        """The nnU-Net step that makes this site ready: ``what`` is ``plans``, ``preprocess`` or ``fingerprint``."""
        dataset_id = self.dataset[7:10] if self.dataset.startswith("Dataset") else self.dataset
        commands = {
            "preprocess": f"nnUNetv2_preprocess -d {dataset_id} -plans_name {self.plans} -c {self.configuration}",
            "plans": (
                f"copy the federation's {self.plans}.json into {self.dataset_folder} "
                f"(nnUNetv2_move_plans_between_datasets), then run "
                f"nnUNetv2_preprocess -d {dataset_id} -plans_name {self.plans} -c {self.configuration}; or keep "
                "this site's own plans: name them with node-config plans='<name>' and set run-config "
                "layer-matching='role' (documentation/hospitals-that-differ.md)"
            ),
            "fingerprint": f"nnUNetv2_extract_fingerprint -d {dataset_id}",
        }
        return commands[what]

    def torch_device(self) -> torch.device:
        """The device to train on."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass(frozen=True)
class TrainOptions:
    """What one round of local training does (read from the server's config record).

    Parameters
    ----------
    local_epochs
        nnU-Net epochs per round (config ``local-epochs``).
    num_epochs
        Length of the learning-rate schedule: the federation's rounds x local epochs (config ``num-epochs``).
    iterations_per_epoch, val_iterations_per_epoch
        Training and pseudo-Dice batches per epoch (``iterations-per-epoch``, ``val-iterations-per-epoch``);
        ``None`` keeps the trainer's own (250 and 50 for ``nnUNetTrainer``).
    proximal_mu
        FedProx coefficient (``proximal-mu``): the local loss gains ``mu / 2 * ||w - w_global||^2``.
    mr_mtl_mu
        MR-MTL (``mr-mtl-mu``; ``None``: off): from round 2 on, the site trains its own personal model, which it
        keeps across rounds instead of loading the global one, with ``mu / 2 * ||w - w_global||^2`` added to its
        loss, and replies with it (the server averages the personal models). ``0`` is plain local training.
    fine_tune_epochs
        Evaluation messages only (``fine-tune-epochs``; 0: none): after the run, fine-tune the global model for
        this many epochs and keep the result as the personal model if its validation Dice is higher.
    seed
        Seeds Python, numpy and torch at the start of the round (``seed``; mixed with the round and the
        site name), so a rebuilt site repeats the live one's round exactly; ``None`` leaves them alone.
    server_round
        The round (``server-round``); round 1 starts a fresh trainer.

    Notes
    -----
    :meth:`from_config` refuses a malformed instruction with :class:`InstructionError`:
    ``server-round`` is required (an integer >= 1; a message without it is not taken as
    round 1), ``local-epochs`` must be an integer from 1 to ``max_local_epochs``
    (:data:`DEFAULT_MAX_LOCAL_EPOCHS` unless the node config sets ``max-local-epochs``),
    ``num-epochs`` an integer >= 1, the iteration counts and ``seed`` integers,
    ``proximal-mu`` and ``mr-mtl-mu`` finite numbers >= 0 and ``fine-tune-epochs`` an integer
    from 0 to ``max_local_epochs``.
    """

    local_epochs: int = 1
    num_epochs: int = 1
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None
    proximal_mu: float = 0.0
    mr_mtl_mu: float | None = None
    fine_tune_epochs: int = 0
    seed: int | None = None
    server_round: int = 1

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], *, max_local_epochs: int = DEFAULT_MAX_LOCAL_EPOCHS
    ) -> TrainOptions:
        """Options from a received ``ConfigRecord``, every entry checked (missing optional keys take the defaults).

        Parameters
        ----------
        config
            The instruction's config record.
        max_local_epochs
            The most local epochs this site trains in one round.

        Raises
        ------
        InstructionError
            Naming the first missing, mistyped or out-of-range entry.
        """

        def optional_int(key: str) -> int | None:
            value = _config_int(config, key, None)
            return None if value is None or value <= 0 else value

        def epochs(key: str, default: int, minimum: int) -> int:
            value = _at_least(key, _config_int(config, key, default), minimum)
            if value > max_local_epochs:
                raise InstructionError(
                    f"config {key!r} = {value} exceeds this site's bound of {max_local_epochs}; lower run-config "
                    f'{key!r}, or raise the bound with the SuperNode\'s --node-config "max-local-epochs=N"'
                )
            return value

        server_round = _at_least("server-round", _config_int(config, "server-round"), 1)
        local_epochs = epochs("local-epochs", 1, 1)
        proximal_mu, mr_mtl_mu = _config_float(config, "proximal-mu", 0.0), None
        if "mr-mtl-mu" in config:
            mr_mtl_mu = _config_float(config, "mr-mtl-mu", 0.0)
        for key, value in (("proximal-mu", proximal_mu), ("mr-mtl-mu", mr_mtl_mu or 0.0)):
            if value < 0:
                raise InstructionError(f"config {key!r} must be >= 0, got {value}")
        fine_tune_epochs = epochs("fine-tune-epochs", 0, 0)
        return cls(
            local_epochs=local_epochs,
            num_epochs=_at_least("num-epochs", _config_int(config, "num-epochs", local_epochs * server_round), 1),
            iterations_per_epoch=optional_int("iterations-per-epoch"),
            val_iterations_per_epoch=optional_int("val-iterations-per-epoch"),
            proximal_mu=proximal_mu,
            mr_mtl_mu=mr_mtl_mu,
            fine_tune_epochs=fine_tune_epochs,
            seed=_config_int(config, "seed", None),
            server_round=server_round,
        )


_NOT_PLANS = frozenset({"dataset.json", "dataset_fingerprint.json", "splits_final.json"})


def plans_files(folder: Path) -> dict[str, dict]:
    """File stem -> plans of every nnU-Net plans file in ``folder`` (a JSON object with ``plans_name`` and
    ``configurations``), in name order; unreadable files are skipped."""
    found = {}
    for path in sorted(Path(folder).glob("*.json")):
        if path.name in _NOT_PLANS:
            continue
        try:
            about = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(about, dict) and "plans_name" in about and "configurations" in about:
            found[path.stem] = about
    return found


def find_site_plans(federation: str, folder: Path, site: str) -> str:
    """This site's own plans name, found in its preprocessed dataset ``folder`` (simulation with run-config
    ``layer-matching = "role"``, where Flower gives a node no node config of its own).

    ``federation`` (run-config ``plans``) when the folder holds ``<federation>.json`` or no plans file at all (the
    site's checks then name what is missing), else the one plans file there (:func:`plans_files`).

    Raises
    ------
    SiteError
        If several plans files fit, naming them and the fix.
    """
    folder = Path(folder)
    if (folder / f"{federation}.json").is_file() or not folder.is_dir():
        return federation
    found = list(plans_files(folder))
    if len(found) > 1:
        raise SiteError(
            f"{site}: {folder} holds several plans ({', '.join(found)}) and not the federation's {federation}.json: "
            "keep the one this site trains there"
        )
    return found[0] if found else federation
