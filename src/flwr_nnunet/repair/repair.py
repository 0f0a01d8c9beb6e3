"""Repair an nnU-Net checkpoint: write it again with every alias group sharing one tensor.

:func:`repair_checkpoint` (``flwr-nnunet repair``) takes the groups from the
network nnU-Net builds from the checkpoint's plans (see
:mod:`flwr_nnunet.repair.inspection`), resolves groups whose copies diverged by
the caller's rules, and writes the file atomically.
"""

from __future__ import annotations

import fnmatch
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from flwr_nnunet.core.aliasing import AliasMap
from flwr_nnunet.nnunet.checkpoint_io import (
    CheckpointError,
    RepairRefused,
    atomic_save,
    load_checkpoint,
    split_checkpoint,
)
from flwr_nnunet.repair.inspection import DivergedGroup, describe_difference, group_status, json_float, megabytes
from flwr_nnunet.repair.network_source import NetworkHints, find_model_source, reference_alias_map

__all__ = ["RepairReport", "repair_checkpoint"]

_PREFER_FIRST, _PREFER_LAST = "first", "last"


@dataclass
class RepairReport:
    """What :func:`repair_checkpoint` did; ``to_dict()`` is the ``--json`` form."""

    source: str
    destination: str
    keys: int
    groups: int
    regrouped: int
    resolved: list[dict[str, Any]]
    restored_dtypes: list[str]
    unique_bytes: int
    bytes_before: int
    bytes_after: int
    written: bool = True

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)

    def format(self) -> str:
        """The human-readable summary."""
        if not self.written:
            return (
                f"nothing to repair: {self.source} already shares storage in all {self.groups} alias groups "
                f"({self.keys} keys, {megabytes(self.bytes_before)} on disk, unique tensors "
                f"{megabytes(self.unique_bytes)}); {self.destination} not written (pass --force to write it anyway)"
            )
        lines = [
            (
                f"wrote {self.destination}: {self.keys} keys in {self.groups} alias groups, "
                f"{self.regrouped} groups share storage again"
            ),
            (
                f"size {megabytes(self.bytes_before)} -> {megabytes(self.bytes_after)} "
                f"(unique tensors {megabytes(self.unique_bytes)})"
            ),
        ]
        lines += [
            f"resolved {r['keys'][0]}: kept {r['winner']} ({describe_difference(r['max_abs_diff'])})"
            for r in self.resolved
        ]
        if self.restored_dtypes:
            lines.append(f"restored integer dtype of {', '.join(self.restored_dtypes)}")
        return "\n".join(lines)


def _winner(group: DivergedGroup, prefer: Sequence[str]) -> str | None:
    """The key whose value the group keeps, from the first ``prefer`` rule that picks one."""
    for rule in prefer:
        if rule == _PREFER_FIRST:
            return group.keys[0]
        if rule == _PREFER_LAST:
            return group.keys[-1]
        chosen = next((k for k in group.keys if fnmatch.fnmatchcase(k, rule)), None)
        if chosen is not None:
            return chosen
    return None


def _own_storage(tensor: torch.Tensor, used_storages: set[int]) -> torch.Tensor:
    """``tensor`` when it alone fills its whole storage, else a compact copy (saving writes whole storages)."""
    storage = tensor.untyped_storage()
    if (
        tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and storage.nbytes() == tensor.nbytes
        and storage.data_ptr() not in used_storages
    ):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _restore_integer_dtype(key: str, value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor | None:
    """``value`` cast back to the network's integer dtype, None when it already has it."""
    if value.dtype == reference.dtype or reference.is_floating_point() or reference.is_complex():
        return None
    if value.is_floating_point() and not torch.equal(value, value.round()):
        raise RepairRefused(
            f"{key!r} must be {reference.dtype} but holds non-integer values {value.flatten()[:3].tolist()}"
        )
    return value.to(reference.dtype)


def _check_destination(source: Path, destination: Path, overwrite: bool) -> None:
    if destination.exists() and source.exists() and os.path.samefile(source, destination):
        raise CheckpointError(f"OUT must differ from IN ({destination}); IN is never modified")
    if destination.is_dir():
        raise CheckpointError(f"OUT {destination} is a directory")
    if destination.exists() and not overwrite:
        raise CheckpointError(f"OUT {destination} exists; pass --force to replace it")
    if not destination.parent.is_dir():
        raise CheckpointError(f"the folder of OUT {destination} does not exist")


def _verify_written(alias_map: AliasMap, canonical: Mapping[str, torch.Tensor], is_checkpoint: bool) -> Any:
    """A check for :func:`atomic_save`: the file reloads with every key, shared aliases and the same values."""

    def check(temp: Path) -> None:
        weights, container = split_checkpoint(load_checkpoint(temp), temp)
        if (
            list(weights) != list(alias_map.keys)
            or (container is not None) != is_checkpoint
            or AliasMap.from_state_dict(weights) != alias_map
            or not all(torch.equal(weights[k], v) for k, v in canonical.items())
        ):
            raise RepairRefused("the written file did not reload with the repaired weights; nothing was replaced")

    return check


def repair_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    hints: NetworkHints | None = None,
    atol: float = 0.0,
    prefer: Sequence[str] = (),
    overwrite: bool = False,
    write_healthy: bool = False,
) -> RepairReport:
    """Write ``destination``: ``source`` with every alias group sharing one tensor again.

    Parameters
    ----------
    source
        The checkpoint to repair (an nnU-Net trainer or global checkpoint, or a
        plain state_dict); never modified.
    destination
        Where the repaired file goes, written atomically; every key and every
        non-weight entry of ``source`` is kept.
    hints
        Override what the checkpoint says about its network (see :func:`find_model_source`).
    atol
        Aliases within this absolute difference count as agreeing; the group keeps
        its canonical (first) key's value.
    prefer
        Rules for groups whose aliases disagree, tried in order: ``"first"`` or
        ``"last"`` (key in state_dict order; nnU-Net's ``load_state_dict``
        effectively keeps the last) or a glob pattern (the group's first key that
        matches wins). Without a rule that picks a key, the repair is refused.
    overwrite
        Replace ``destination`` when it exists.
    write_healthy
        Write ``destination`` even when ``source`` needs no repair (every group already shares one
        storage that holds just its tensor, no integer dtype to restore); without it nothing is written and the report says so
        (``written`` False).

    Raises
    ------
    CheckpointError
        If ``source`` cannot be read or is not an nnU-Net checkpoint, or ``destination`` is not usable.
    RepairRefused
        If the network cannot be rebuilt or does not match, or aliases disagree with no rule picking a winner.
    """
    source, destination = Path(source), Path(destination)
    _check_destination(source, destination, overwrite)
    state_dict, container = split_checkpoint(load_checkpoint(source), source)
    model = find_model_source(container, source, hints or NetworkHints())
    if model is None:
        raise RepairRefused(
            f"cannot find the network of {source}: no plans in its init_args or model folder; "
            "pass --plans and --dataset-json"
        )
    alias_map, reference, _ = reference_alias_map(state_dict, model)
    canonical: OrderedDict[str, torch.Tensor] = OrderedDict()
    resolved, unresolved, restored, regrouped, compacted = [], [], [], 0, 0
    used_storages: set[int] = set()
    for key, group in alias_map.groups.items():
        shared, divergence = group_status(state_dict, group, atol)
        regrouped += not shared
        winner = key if divergence is None else _winner(divergence, prefer)
        if winner is None:
            unresolved.append(divergence)
            continue
        if divergence is not None:
            resolved.append(
                {"keys": list(group), "winner": winner, "max_abs_diff": json_float(divergence.max_abs_diff)}
            )
        restored_value = _restore_integer_dtype(winner, state_dict[winner], reference[winner])
        if restored_value is not None:
            restored.append(key)
        original = state_dict[winner] if restored_value is None else restored_value
        value = _own_storage(original, used_storages)
        compacted += value is not original
        used_storages.add(value.untyped_storage().data_ptr())
        canonical[key] = value
    if unresolved:
        raise RepairRefused(
            f"aliases disagree in {len(unresolved)} of {len(alias_map)} groups, first: {unresolved[0].describe()}; "
            "pick which key wins with --prefer (first, last or a key pattern) or allow differences with --atol"
        )
    unique_bytes = sum(t.nbytes for t in canonical.values())
    if not regrouped and not restored and not compacted and not write_healthy:
        return RepairReport(
            source=str(source),
            destination=str(destination),
            keys=len(state_dict),
            groups=len(alias_map),
            regrouped=0,
            resolved=[],
            restored_dtypes=[],
            unique_bytes=unique_bytes,
            bytes_before=source.stat().st_size,
            bytes_after=0,
            written=False,
        )
    weights = alias_map.expand(canonical)
    metadata = getattr(state_dict, "_metadata", getattr(reference, "_metadata", None))
    if metadata is not None:
        weights._metadata = metadata
    repaired = weights if container is None else {**container, "network_weights": weights}
    atomic_save(repaired, destination, check=_verify_written(alias_map, canonical, container is not None))
    return RepairReport(
        source=str(source),
        destination=str(destination),
        keys=len(weights),
        groups=len(alias_map),
        regrouped=regrouped,
        resolved=resolved,
        restored_dtypes=restored,
        unique_bytes=unique_bytes,
        bytes_before=source.stat().st_size,
        bytes_after=destination.stat().st_size,
    )
