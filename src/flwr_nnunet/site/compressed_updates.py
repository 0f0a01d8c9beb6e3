"""A site's side of run-config ``compression``: the model it holds of the server's, and its error feedback.

The server sends the reference model whole, as a compressed delta from the one the site holds, or only its digest
(:mod:`flwr_nnunet.strategy.model_sender`); :func:`received_model` rebuilds it (the delta added on the CPU, as
the server adds it), checks its digest and keeps it in ``flwr_site_held_model.pth`` beside the round state. The
site's reply is its update (its trained model minus the model received) compressed with error feedback
(:func:`compressed_reply`): the residual, what compression left out, is kept per round in
``flwr_site_residual.round-<r>.pth`` for :data:`~flwr_nnunet.site.trainer_state.KEPT_ROUNDS` rounds, as the round
states are, and round ``r`` adds the newest residual of a round before ``r``: a restarted site, or one that rolled
back to train a round again, adds exactly the residual it added the first time. Both files are read with the
safe loader and written atomically.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore import log

from flwr_nnunet.core.codec import PayloadError, from_array_record
from flwr_nnunet.core.delta_codec import (
    BASE_KEY,
    COMPRESSION_KEY,
    MODEL_KEY,
    SCALES_RECORD,
    apply_delta,
    decode_delta,
    encode_delta,
)
from flwr_nnunet.core.quantize import Scheme, scheme_named
from flwr_nnunet.nnunet.checkpoint_io import CheckpointError, atomic_save, load_checkpoint
from flwr_nnunet.nnunet.digests import tensors_sha256
from flwr_nnunet.site.spec import InstructionError, SiteError
from flwr_nnunet.site.trainer_state import KEPT_ROUNDS

__all__ = [
    "HELD_MODEL_FILE",
    "compress_reply_content",
    "compressed_reply",
    "held_digest",
    "received_model",
    "residual_file",
]

HELD_MODEL_FILE = "flwr_site_held_model.pth"
_RESIDUAL = re.compile(r"flwr_site_residual\.round-(\d+)\.pth")


def residual_file(folder: Path, server_round: int) -> Path:
    """Where the residual after ``server_round`` is kept."""
    return folder / f"flwr_site_residual.round-{server_round}.pth"


def _scheme(config: ConfigRecord) -> Scheme:
    try:
        scheme = scheme_named(str(config[COMPRESSION_KEY]))
    except ValueError as error:
        raise InstructionError(f"config {COMPRESSION_KEY!r}: {error}") from None
    if scheme is None:
        raise InstructionError(f"config {COMPRESSION_KEY!r} is 'none' in a compressed instruction")
    return scheme


def _held(folder: Path) -> tuple[str, OrderedDict[str, torch.Tensor]] | None:
    """(digest, tensors) of the model this site holds, or None when it holds none."""
    path = folder / HELD_MODEL_FILE
    if not path.is_file():
        return None
    try:
        held = load_checkpoint(path)
        return str(held["sha256"]), OrderedDict(held["tensors"])
    except (CheckpointError, KeyError, TypeError, ValueError) as error:
        log(INFO, "%s is unreadable (%s): this site holds no model of the server's", path, error)
        return None


def held_digest(folder: Path) -> str | None:
    """The digest of the model this site holds of the server's (None: none)."""
    held = _held(folder)
    return None if held is None else held[0]


def received_model(folder: Path, config: ConfigRecord, records: Mapping[str, Any]) -> OrderedDict[str, torch.Tensor]:
    """The model a compressed instruction brings this site to, kept as the model the site holds.

    ``records`` are the instruction's (``arrays``, and ``scales`` for a delta); ``config`` its config record.

    Raises
    ------
    InstructionError
        If the instruction is malformed, its delta does not decode, or the rebuilt model's digest is not the
        one announced (``model-sha256``).
    SiteError
        If the delta is from a model this site does not hold (the server then sends the whole model).
    """
    scheme, digest, base = _scheme(config), config.get(MODEL_KEY), config.get(BASE_KEY)
    if not isinstance(digest, str) or not (base is None or isinstance(base, str)):
        raise InstructionError(f"config {MODEL_KEY!r} (and {BASE_KEY!r}) must be digests (text)")
    arrays = records.get("arrays")
    if not isinstance(arrays, ArrayRecord):
        raise InstructionError("a compressed instruction carries no ArrayRecord 'arrays'")
    held = None if base is None else _held(folder)
    if base is not None and (held is None or held[0] != base):
        raise SiteError(
            f"the server sent a delta from model {base[:12]}..., but this site holds "
            f"{'none' if held is None else held[0][:12] + '...'}; it gets the whole model next time"
        )
    try:
        if base is None:
            model = OrderedDict((k, v.clone()) for k, v in from_array_record(arrays).items())
        elif base == digest:
            if len(arrays):
                raise PayloadError("an instruction for the model the site holds must carry no arrays")
            model = held[1]
        else:
            scales = records.get(SCALES_RECORD, ArrayRecord())
            model = apply_delta(held[1], decode_delta((arrays, scales), held[1], scheme))
    except PayloadError as error:
        raise InstructionError(f"the compressed model cannot be decoded ({error})") from None
    if tensors_sha256(model) != digest:
        raise InstructionError(f"the rebuilt model's digest is not {MODEL_KEY} {digest[:12]}...")
    if held is None or held[0] != digest:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save({"sha256": digest, "tensors": dict(model)}, folder / HELD_MODEL_FILE)
    return model


def _residual_before(
    folder: Path, server_round: int, like: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """The newest residual kept after a round before ``server_round`` that fits ``like``'s floating tensors."""
    rounds = [
        int(m.group(1)) for p in folder.glob("flwr_site_residual.round-*.pth") if (m := _RESIDUAL.fullmatch(p.name))
    ]
    earlier = [r for r in rounds if r < server_round]
    if not earlier:
        return None
    try:
        residual = dict(load_checkpoint(residual_file(folder, max(earlier))))
    except (CheckpointError, TypeError, ValueError) as error:
        log(INFO, "the residual of round %d is unreadable (%s): starting without", max(earlier), error)
        return None
    floating = {k: v for k, v in like.items() if v.is_floating_point()}
    fits = residual.keys() == floating.keys() and all(
        isinstance(residual[k], torch.Tensor) and residual[k].shape == v.shape for k, v in floating.items()
    )
    return residual if fits else None


def compressed_reply(
    folder: Path,
    server_round: int,
    trained: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    config: ConfigRecord,
) -> tuple[dict[str, ArrayRecord], dict[str, str]]:
    """The site's update (``trained - received``) plus its residual, compressed as the instruction's ``config``
    says: the reply's records and config entries. The new residual is kept as the one after ``server_round``.

    Raises
    ------
    SiteError
        If the update cannot be compressed (not finite, or too large for the scheme).
    """
    scheme = _scheme(config)
    residual = _residual_before(folder, server_round, received)
    try:
        (codes, scales), left = encode_delta(trained, received, scheme, residual)
    except ValueError as error:
        raise SiteError(f"the update cannot be compressed with {scheme.name}: {error}") from None
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save(dict(left), residual_file(folder, server_round))
    for path in folder.glob("flwr_site_residual.round-*.pth"):
        match = _RESIDUAL.fullmatch(path.name)
        if match and not server_round - KEPT_ROUNDS < int(match.group(1)) <= server_round:
            path.unlink(missing_ok=True)
    records = {"arrays": codes, SCALES_RECORD: scales}
    return records, {COMPRESSION_KEY: scheme.name, BASE_KEY: str(config[MODEL_KEY])}


def compress_reply_content(
    folder: Path,
    server_round: int,
    content: dict[str, Any],
    received: Mapping[str, torch.Tensor],
    config: ConfigRecord,
) -> None:
    """Make the content of a reply to a compressed instruction compressed, in place: its ``arrays`` (the trained
    model, if any) become the compressed update (:func:`compressed_reply`), and its ``config`` names the model the
    site holds (``base-sha256``).

    Raises
    ------
    SiteError
        As :func:`compressed_reply`.
    """
    about = content["config"]
    about[BASE_KEY] = str(config[MODEL_KEY])
    if "arrays" in content:
        records, entries = compressed_reply(
            folder, server_round, from_array_record(content["arrays"]), received, config
        )
        content.update(records)
        about.update(entries)
