"""Inspect and repair nnU-Net checkpoints whose aliases lost their shared storage.

Per-key arithmetic on an nnU-Net state_dict (weight averaging, model soups, EMA
exports, ``.half()``) turns every alias of a shared tensor into its own copy:
the file grows 2.8-3.75x and the copies may drift apart. The alias groups of such
a file cannot be read from its storage any more, so they come from the network
nnU-Net builds from the checkpoint's plans; :func:`inspect_checkpoint` reports
the damage and :func:`repair_checkpoint` writes a file whose aliases share
storage again.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from flwr_nnunet.core.aliasing import AliasMap, PartialOverlapError
from flwr_nnunet.nnunet.checkpoint_io import (
    CheckpointError,
    RepairRefused,
    atomic_save,
    load_checkpoint,
    split_checkpoint,
)
from flwr_nnunet.repair.network_source import NetworkHints, find_model_source, reference_alias_map

__all__ = ["DivergedGroup", "InspectReport", "RepairReport", "inspect_checkpoint", "repair_checkpoint"]

_PREFER_FIRST, _PREFER_LAST = "first", "last"


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
        return f"{self.keys[0]} vs {', '.join(self.disagreeing)} ({_difference(self.max_abs_diff)})"


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
            {"keys": list(g.keys), "disagreeing": list(g.disagreeing), "max_abs_diff": _json_float(g.max_abs_diff)}
            for g in self.diverged_groups
        ]
        return data

    def format(self, limit: int = 10) -> str:
        """The human-readable report; lists at most ``limit`` groups per section."""
        which = _which(self.trainer_name, self.configuration)
        lines = [
            f"{self.path}: {self.kind}{which}, {_megabytes(self.file_bytes)} on disk",
            f"alias groups from   {self.groups_from}",
            f"keys                {self.keys}",
            f"alias groups        {self.groups} ({self.alias_groups} with more than one key)",
            f"unique tensors      {self.groups}, {_megabytes(self.unique_bytes)}",
            f"stored tensors      {_megabytes(self.stored_bytes)} ({self.bloat_factor:.2f}x the unique bytes)",
            f"lost sharing        {len(self.lost_groups)} of {self.alias_groups} alias groups",
        ]
        lines += _listing([f"{g[0]} (+{len(g) - 1} aliases)" for g in self.lost_groups], limit)
        lines.append(f"aliases disagree    {len(self.diverged_groups) or 'none'}")
        lines += _listing([g.describe() for g in self.diverged_groups], limit)
        if self.other_entries:
            lines.append(f"other entries       {', '.join(self.other_entries)}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)

    def format(self) -> str:
        """The human-readable summary."""
        lines = [
            (
                f"wrote {self.destination}: {self.keys} keys in {self.groups} alias groups, "
                f"{self.regrouped} groups share storage again"
            ),
            (
                f"size {_megabytes(self.bytes_before)} -> {_megabytes(self.bytes_after)} "
                f"(unique tensors {_megabytes(self.unique_bytes)})"
            ),
        ]
        lines += [
            f"resolved {r['keys'][0]}: kept {r['winner']} ({_difference(r['max_abs_diff'])})" for r in self.resolved
        ]
        if self.restored_dtypes:
            lines.append(f"restored integer dtype of {', '.join(self.restored_dtypes)}")
        return "\n".join(lines)


def _difference(value: float | str) -> str:
    return "shape, dtype or NaN differs" if value in (math.inf, "inf") else f"max |diff| {value:.6g}"


def _kind(container: Mapping[str, Any] | None) -> str:
    if container is None:
        return "state_dict"
    return "flwr-nnunet global checkpoint" if "flwr_nnunet" in container else "nnU-Net checkpoint"


def _which(trainer_name: str | None, configuration: str | None) -> str:
    known = [str(v) for v in (trainer_name, configuration) if v]
    return f" ({', '.join(known)})" if known else ""


def _json_float(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


def _megabytes(n: int) -> str:
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


def _group_status(
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
        shared, divergence = _group_status(state_dict, group, atol)
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
    resolved, unresolved, restored, regrouped = [], [], [], 0
    used_storages: set[int] = set()
    for key, group in alias_map.groups.items():
        shared, divergence = _group_status(state_dict, group, atol)
        regrouped += not shared
        winner = key if divergence is None else _winner(divergence, prefer)
        if winner is None:
            unresolved.append(divergence)
            continue
        if divergence is not None:
            resolved.append(
                {"keys": list(group), "winner": winner, "max_abs_diff": _json_float(divergence.max_abs_diff)}
            )
        restored_value = _restore_integer_dtype(winner, state_dict[winner], reference[winner])
        if restored_value is not None:
            restored.append(key)
        value = _own_storage(state_dict[winner] if restored_value is None else restored_value, used_storages)
        used_storages.add(value.untyped_storage().data_ptr())
        canonical[key] = value
    if unresolved:
        raise RepairRefused(
            f"aliases disagree in {len(unresolved)} of {len(alias_map)} groups, first: {unresolved[0].describe()}; "
            "pick which key wins with --prefer (first, last or a key pattern) or allow differences with --atol"
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
        unique_bytes=sum(t.nbytes for t in canonical.values()),
        bytes_before=source.stat().st_size,
        bytes_after=destination.stat().st_size,
    )
