"""A site's round state on disk: the trainer checkpoint written after every round, its token and kept rounds.

Where the process does not survive between rounds (a Flower SuperNode starts a
fresh process per message) the trainer is rebuilt from the site's state file,
an nnU-Net trainer checkpoint written after every round
(``<fold folder>/flwr_site_state.pth``), which gives the same epoch counter,
learning rate, optimizer state and logs as the live trainer. The file holds only
tensors and plain Python values and is read with the project's safe loader
(``weights_only=True``), never with nnU-Net's ``load_checkpoint`` (which unpickles anything).
Beside it, ``flwr_site_state.json`` holds a fresh token per saved round (and the round), so a process can tell
that another one trained since. The states after the last :data:`KEPT_ROUNDS` rounds stay beside it
(``flwr_site_state.round-<r>.pth``, hard links): a server that resumed from an earlier checkpoint sends a round
the site trained already, and the site starts it from its state after the round before (:func:`round_start`),
so every round is trained once.

A round whose training ends non-finite is refused without writing the state file
(:func:`save_state`), so the previous round's state stays.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.supercore import log
from torch import nn

from flwr_nnunet.nnunet.checkpoint_io import CheckpointError, atomic_save, atomic_write, load_checkpoint, temp_path
from flwr_nnunet.site.spec import SiteError, SiteSpec

__all__ = [
    "KEPT_ROUNDS",
    "RoundStart",
    "disk_token",
    "first_non_finite",
    "load_state",
    "restore_trainer",
    "round_start",
    "round_state_file",
    "save_state",
    "trained_round",
    "trainer_state",
    "unwrapped",
    "write_token",
]


def first_non_finite(tensors: Mapping[str, Any]) -> str | None:
    """The first key (in ``tensors``' order) of a floating-point tensor holding NaN or Inf, else ``None``."""
    for key, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return key
    return None


def unwrapped(network: nn.Module) -> nn.Module:
    """``network`` without its ``torch.compile`` wrapper (itself when it has none)."""
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
        "network_weights": unwrapped(trainer.network).state_dict(),
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
        raise ValueError("'network_weights' and 'optimizer_state' must be mappings")  # noqa: TRY004 - a corrupt file
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
    unwrapped(trainer.network).load_state_dict(weights)
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
    temp = temp_path(destination)
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


def write_token(spec: SiteSpec, epoch: int, server_round: int | None) -> str:
    """Write a fresh token (with ``epoch`` and, when given, ``server_round``) beside the state; return the token."""
    fresh = uuid.uuid4().hex
    entries = {"token": fresh, "epoch": epoch}
    if server_round is not None:
        entries["round"] = server_round
    token = json.dumps(entries).encode()
    atomic_write(spec.state_token_file, lambda file: file.write(token))
    return fresh


def disk_token(spec: SiteSpec) -> str | None:
    """The token of the state on disk, ``None`` when none was written."""
    path = spec.state_token_file
    return str(json.loads(path.read_text())["token"]) if path.is_file() else None


def trained_round(spec: SiteSpec) -> int | None:
    """The round the state on disk was saved after, ``None`` when the token records none."""
    path = spec.state_token_file
    saved = json.loads(path.read_text()).get("round") if path.is_file() else None
    return saved if isinstance(saved, int) else None


def save_state(spec: SiteSpec, trainer: Any, server_round: int | None = None) -> str:
    """Write the round state (:func:`trainer_state`), atomically, once it is finite and reads back safely.

    With ``server_round``, the state is also kept as the state after that round (:func:`round_state_file`,
    a hard link: no copy), for :data:`KEPT_ROUNDS` rounds, and the token records the round.

    Returns
    -------
    str
        The new token (:func:`write_token`).

    Raises
    ------
    SiteError
        If the network or the optimizer state holds NaN or Inf; the previous state file is kept.
    """
    state = trainer_state(trainer)
    bad = _first_non_finite_state(state["network_weights"], state["optimizer_state"])
    if bad is not None:
        raise SiteError(
            f"{spec.name}: training went non-finite ({bad!r} holds NaN or Inf); the round is refused and "
            f"the previous round state {spec.state_file} is kept"
        )
    atomic_save(state, spec.state_file, check=load_checkpoint)  # refuse a file the safe loader cannot read
    token = write_token(spec, int(trainer.current_epoch), server_round)
    if server_round is not None:
        _keep_round_state(spec, server_round)
    return token


def load_state(spec: SiteSpec, trainer: Any, path: Path | None = None) -> None:
    """Restore a new trainer from the state file (or ``path``, a kept round state), read with the safe loader
    (``weights_only=True``).

    Raises
    ------
    SiteError
        If the file cannot be read safely or is not a usable round state.
    """
    path = spec.state_file if path is None else path
    try:
        restore_trainer(trainer, load_checkpoint(path))
    except (CheckpointError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise SiteError(
            f"{spec.name}: the site's round state {path} is refused ({error}); it was not written by this "
            "site, or is damaged: remove it (and flwr_site_state.json) to start this site from the global model "
            "with a fresh optimizer"
        ) from None


@dataclass(frozen=True)
class RoundStart:
    """Where a message's trainer starts from: the live trainer, a round state file, or a fresh trainer.

    Attributes
    ----------
    keep_live
        The process's live trainer is the site's state: keep it.
    state_file
        Otherwise the round state to rebuild the trainer from; ``None``: a fresh trainer.
    rolled_back_from
        The round the state on disk is after, when the message is of a round this site trained already.
    """

    keep_live: bool
    state_file: Path | None = None
    rolled_back_from: int | None = None


def round_start(spec: SiteSpec, server_round: int, live_token: str | None, *, live: bool, training: bool) -> RoundStart:
    """Where a ``server_round`` message starts, from the state on disk and the live trainer (``live``) with the
    token of the state it was built from or saved (``live_token``). Nothing is written: the state after the round
    is, once it is trained (:func:`save_state`).

    A training message of round 1 starts fresh. One of a round this site trained already (the server resumed from
    an earlier checkpoint, e.g. after it was killed) starts from the state after round ``server_round - 1``
    (a fresh trainer for round 1), so every round is trained once and the learning-rate schedule is the
    uninterrupted one. Otherwise the live trainer is kept unless another process (another simulation actor) has
    trained this site since; then, as without a live trainer, it is rebuilt from the state file (after round 1).
    An evaluation message keeps any live trainer.

    Raises
    ------
    SiteError
        If the state to go back to is no longer kept (the server resumed from more than :data:`KEPT_ROUNDS`
        rounds back).
    """
    saved = trained_round(spec) if training else None
    if saved is not None and saved >= server_round:
        return RoundStart(False, _rolled_back(spec, server_round, saved), rolled_back_from=saved)
    if training and server_round == 1:
        return RoundStart(keep_live=False)
    if live and (not training or disk_token(spec) in (None, live_token)):
        return RoundStart(keep_live=True)
    if live:
        log(INFO, "%s: %s is newer than this process's trainer; rebuilding from it", spec.name, spec.state_file)
    resume = server_round > 1 and spec.state_file.is_file()
    return RoundStart(keep_live=False, state_file=spec.state_file if resume else None)


def _rolled_back(spec: SiteSpec, server_round: int, saved: int) -> Path | None:
    """The state after round ``server_round - 1`` (the state on disk is after ``saved``), ``None`` for round 1.

    Raises
    ------
    SiteError
        If that state is no longer kept.
    """
    target = server_round - 1
    source = round_state_file(spec, target) if target > 0 else None
    if source is not None and not source.is_file():
        raise SiteError(
            f"{spec.name}: the server sends round {server_round}, which this site trained already (its "
            f"state is at round {saved}), but the state after round {target} ({source}) is no longer kept; "
            "resume the server from a later checkpoint, or remove this site's flwr_site_state.* files to "
            "start it from the global model with a fresh optimizer"
        )
    return source
