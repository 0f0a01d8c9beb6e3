"""Inspect an nnU-Net checkpoint whose aliases may have lost their shared storage.

Per-key arithmetic on an nnU-Net state_dict (weight averaging, model soups, EMA
exports, ``.half()``) turns every alias of a shared tensor into its own copy:
the file grows 2.8-3.75x and the copies may drift apart. The alias groups of such
a file cannot be read from its storage any more, so they come from the network
nnU-Net builds from the checkpoint's plans; :func:`inspect_checkpoint` reports
the damage (``flwr-nnunet inspect``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from flwr_nnunet.core.aliasing import AliasMap, PartialOverlapError
from flwr_nnunet.nnunet.checkpoint_io import (
    RepairRefused,
    load_checkpoint,
    split_checkpoint,
)
from flwr_nnunet.repair.network_source import NetworkHints, find_model_source, reference_alias_map

__all__ = [
    "DivergedGroup",
    "InspectReport",
    "describe_difference",
    "group_status",
    "inspect_checkpoint",
    "json_float",
    "megabytes",
]


@dataclass(frozen=True)
class DivergedGroup:
    """An alias group whose keys hold different values.

    Attributes
    ----------
    keys
        Every key of the group, canonical first.
    disagreeing
        The keys whose value differs from the canonical key's.
    max_abs_diff
        Largest absolute difference to the canonical value (``inf`` for a shape or dtype mismatch).
    """

    keys: tuple[str, ...]
    disagreeing: tuple[str, ...]
    max_abs_diff: float

    def describe(self) -> str:
        """One line: the canonical key, the disagreeing keys and the largest difference."""
        return f"{self.keys[0]} vs {', '.join(self.disagreeing)} ({describe_difference(self.max_abs_diff)})"


@dataclass
class InspectReport:
    """What :func:`inspect_checkpoint` found; ``to_dict()`` is the ``--json`` form."""

    path: str
    file_bytes: int
    kind: str
    trainer_name: str | None
    configuration: str | None
    groups_from: str
    keys: int
    groups: int
    alias_groups: int
    unique_bytes: int
    stored_bytes: int
    lost_groups: list[tuple[str, ...]]
    diverged_groups: list[DivergedGroup]
    other_entries: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def bloat_factor(self) -> float:
        """Tensor bytes the file stores per unique tensor byte (1.0 when every alias shares storage)."""
        return self.stored_bytes / self.unique_bytes if self.unique_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field plus ``bloat_factor``."""
        data = asdict(self)
        data["bloat_factor"] = round(self.bloat_factor, 4)
        data["lost_groups"] = [list(g) for g in self.lost_groups]
        data["diverged_groups"] = [
            {"keys": list(g.keys), "disagreeing": list(g.disagreeing), "max_abs_diff": json_float(g.max_abs_diff)}
            for g in self.diverged_groups
        ]
        return data

    def format(self, limit: int = 10) -> str:
        """The human-readable report; lists at most ``limit`` groups per section."""
        which = _which(self.trainer_name, self.configuration)
        lines = [
            f"{self.path}: {self.kind}{which}, {megabytes(self.file_bytes)} on disk",
            f"alias groups from   {self.groups_from}",
            f"keys                {self.keys}",
            f"alias groups        {self.groups} ({self.alias_groups} with more than one key)",
            f"unique tensors      {self.groups}, {megabytes(self.unique_bytes)}",
            f"stored tensors      {megabytes(self.stored_bytes)} ({self.bloat_factor:.2f}x the unique bytes)",
            f"lost sharing        {len(self.lost_groups)} of {self.alias_groups} alias groups",
        ]
        lines += _listing([f"{g[0]} (+{len(g) - 1} aliases)" for g in self.lost_groups], limit)
        lines.append(f"aliases disagree    {len(self.diverged_groups) or 'none'}")
        lines += _listing([g.describe() for g in self.diverged_groups], limit)
        if self.other_entries:
            lines.append(f"other entries       {', '.join(self.other_entries)}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def describe_difference(value: float | str) -> str:
    return "shape, dtype or NaN differs" if value in (math.inf, "inf") else f"max |diff| {value:.6g}"


def _kind(container: Mapping[str, Any] | None) -> str:
    if container is None:
        return "state_dict"
    return "flwr-nnunet global checkpoint" if "flwr_nnunet" in container else "nnU-Net checkpoint"


def _which(trainer_name: str | None, configuration: str | None) -> str:
    known = [str(v) for v in (trainer_name, configuration) if v]
    return f" ({', '.join(known)})" if known else ""


def json_float(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


def megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _listing(items: list[str], limit: int) -> list[str]:
    shown = [f"  {item}" for item in items[:limit]]
    if len(items) > limit:
        shown.append(f"  ... and {len(items) - limit} more (--json lists all)")
    return shown


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference (NaN in both counts as equal; ``inf`` for shape, dtype or NaN mismatch)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return math.inf
    if a.numel() == 0 or _same_view(a, b) or torch.equal(a, b):
        return 0.0
    difference = (a.double() - b.double()).abs().masked_fill(a.isnan() & b.isnan(), 0.0)
    return difference.nan_to_num(nan=math.inf).max().item()


def group_status(
    state_dict: Mapping[str, torch.Tensor], group: tuple[str, ...], atol: float
) -> tuple[bool, DivergedGroup | None]:
    """Whether a group's keys share one view, and how they disagree (None when within ``atol``)."""
    first = state_dict[group[0]]
    shared = all(_same_view(first, state_dict[k]) for k in group[1:]) if first.numel() else True
    if shared:
        return True, None
    differences = {k: _max_abs_diff(first, state_dict[k]) for k in group[1:]}
    disagreeing = tuple(k for k, d in differences.items() if not d <= atol)
    if not disagreeing:
        return False, None
    return False, DivergedGroup(group, disagreeing, max(differences[k] for k in disagreeing))


def _stored_bytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``state_dict`` (what ``torch.save`` writes)."""
    storages = {}
    for tensor in state_dict.values():
        storage = tensor.untyped_storage()
        if storage.data_ptr():
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _alias_map_for_inspection(
    state_dict: Mapping[str, torch.Tensor], container: dict | None, path: Path, hints: NetworkHints, notes: list[str]
) -> tuple[AliasMap, str]:
    """Groups from the network nnU-Net builds when possible, else from storage sharing (with a note why)."""
    try:
        source = find_model_source(container, path, hints)
        if source is not None:
            amap, _, groups_from = reference_alias_map(state_dict, source)
            return amap, groups_from
        reason = "no plans in the checkpoint or beside it (pass --plans and --dataset-json)"
    except RepairRefused as error:
        reason = str(error)
    notes.append(f"{reason}; groups that per-key arithmetic split cannot be seen")
    try:
        return AliasMap.from_state_dict(state_dict), "storage sharing in the file"
    except PartialOverlapError as error:
        notes.append(f"storage sharing is inconsistent ({error}); every key counted on its own")
        return AliasMap(list(state_dict), [(k,) for k in state_dict]), "every key on its own"


def inspect_checkpoint(
    path: str | os.PathLike, *, hints: NetworkHints | None = None, atol: float = 0.0
) -> InspectReport:
    """Report keys, alias groups, unique and stored bytes, lost sharing and disagreeing aliases.

    Parameters
    ----------
    path
        An nnU-Net trainer or global checkpoint, or a plain state_dict file.
    hints
        Override what the checkpoint says about its network (see :func:`find_model_source`).
    atol
        Aliases whose values differ by at most this much count as agreeing.

    Returns
    -------
    InspectReport
        Groups come from the network nnU-Net builds from the plans when they can
        be found and match; otherwise from the tensors' own storage sharing,
        which cannot see groups that per-key arithmetic already split (a note says so).

    Raises
    ------
    CheckpointError
        If the file cannot be read or is not an nnU-Net checkpoint or state_dict.
    """
    path = Path(path)
    state_dict, container = split_checkpoint(load_checkpoint(path), path)
    notes: list[str] = []
    amap, groups_from = _alias_map_for_inspection(state_dict, container, path, hints or NetworkHints(), notes)
    lost, diverged = [], []
    for group in amap.groups.values():
        if len(group) == 1:
            continue
        shared, divergence = group_status(state_dict, group, atol)
        if not shared:
            lost.append(group)
        if divergence is not None:
            diverged.append(divergence)
    init_args = (container or {}).get("init_args") or {}
    return InspectReport(
        path=str(path),
        file_bytes=path.stat().st_size,
        kind=_kind(container),
        trainer_name=(container or {}).get("trainer_name"),
        configuration=init_args.get("configuration") if isinstance(init_args, Mapping) else None,
        groups_from=groups_from,
        keys=len(state_dict),
        groups=len(amap),
        alias_groups=sum(len(g) > 1 for g in amap.groups.values()),
        unique_bytes=sum(state_dict[c].nbytes for c in amap.canonical_keys),
        stored_bytes=_stored_bytes(state_dict),
        lost_groups=lost,
        diverged_groups=diverged,
        other_entries=[k for k in (container or {}) if k != "network_weights"],
        notes=notes,
    )
