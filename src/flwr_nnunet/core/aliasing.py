"""Alias groups of a state_dict: the keys that name one tensor.

nnU-Net networks register one tensor under several names (``decoder.encoder.*``
aliases ``encoder.*``; ``ConvDropoutNormReLU`` holds ``.conv`` and
``.all_modules.0``). An :class:`AliasMap` records which keys share storage, so
that everything crossing a boundary can carry each tensor once (the canonical
form) and be expanded back to every key with the sharing intact.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flwr_nnunet.errors import FlwrNnUNetError, KeyMismatchError

__all__ = [
    "AliasConflictError",
    "AliasMap",
    "KeyMismatchError",
    "PartialOverlapError",
    "find_alias_groups",
    "strip_wrapper_prefixes",
]

_JSON_FORMAT = "flwr-nnunet/alias-map"
_JSON_VERSION = 1
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class AliasConflictError(FlwrNnUNetError, ValueError):
    """The keys of one alias group hold different values."""


class PartialOverlapError(FlwrNnUNetError, ValueError):
    """Two keys are different views that overlap inside one storage."""


@dataclass(frozen=True)
class _View:
    """Where a tensor's bytes lie: its storage and the exact view on it."""

    storage: int
    device: torch.device
    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def byte_range(self) -> tuple[int, int]:
        size = self.dtype.itemsize
        last = sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        start = self.offset * size
        return start, start + (last + 1) * size


def _view_of(tensor: torch.Tensor) -> _View | None:
    """The view a tensor occupies, or None when it cannot share bytes."""
    if tensor.layout != torch.strided or tensor.is_meta or tensor.numel() == 0:
        return None
    storage = tensor.untyped_storage()
    if storage.data_ptr() == 0:
        return None
    return _View(
        storage=storage.data_ptr(),
        device=tensor.device,
        dtype=tensor.dtype,
        offset=tensor.storage_offset(),
        shape=tuple(tensor.shape),
        stride=tuple(tensor.stride()),
    )


def _shares_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are the identical view of one storage."""
    view = _view_of(a)
    return view is not None and view == _view_of(b)


def _byte_mask(view: _View, nbytes: int) -> torch.Tensor:
    """A boolean mask over ``nbytes`` storage bytes marking the bytes ``view`` covers."""
    size = view.dtype.itemsize
    mask = torch.zeros(nbytes, dtype=torch.bool)
    mask.as_strided(
        view.shape + (size,),
        tuple(s * size for s in view.stride) + (1,),
        view.offset * size,
    ).fill_(True)
    return mask


def _views_share_bytes(a: _View, b: _View) -> bool:
    """Whether two different views of one storage touch a common byte."""
    (a0, a1), (b0, b1) = a.byte_range, b.byte_range
    if a1 <= b0 or b1 <= a0:
        return False
    end = max(a1, b1)
    return bool((_byte_mask(a, end) & _byte_mask(b, end)).any())


def find_alias_groups(state_dict: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Group the keys of ``state_dict`` that name the same tensor.

    Two keys are one group when their tensors are the identical view (same
    storage, offset, shape, stride and dtype). Groups come in state_dict order
    of their first key, each listing its keys in state_dict order. Zero-element
    and meta tensors are never grouped with anything.

    Raises
    ------
    PartialOverlapError
        If two keys are different views that overlap in one storage; such a
        state_dict cannot be carried as one tensor per group.
    TypeError
        If a value is not a tensor.
    """
    groups: dict[_View | str, list[str]] = {}
    by_storage: dict[tuple[torch.device, int], list[tuple[_View, str]]] = {}
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"state_dict[{key!r}] is a {type(tensor).__name__}, not a tensor; "
                "pass only the tensors (e.g. checkpoint['network_weights'])"
            )
        view = _view_of(tensor)
        if view is None:
            groups[key] = [key]
            continue
        if view in groups:
            groups[view].append(key)
            continue
        others = by_storage.setdefault((view.device, view.storage), [])
        for other, other_key in others:
            if _views_share_bytes(view, other):
                raise PartialOverlapError(
                    f"{other_key!r} and {key!r} are different views that overlap in one "
                    "storage; give each its own tensor (e.g. .clone()) or make them "
                    "the identical tensor"
                )
        others.append((view, key))
        groups[view] = [key]
    return [tuple(keys) for keys in groups.values()]


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """Remove the ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) prefixes.

    A prefix is removed only when every key carries it, repeatedly, so a
    compiled DDP model's keys match the plain network's. Values are unchanged
    (the same tensor objects), so aliasing is preserved.
    """
    keys = list(state_dict)
    changed = True
    while keys and changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in keys):
                keys = [k[len(prefix) :] for k in keys]
                changed = True
    return OrderedDict(zip(keys, state_dict.values()))


def _values_agree(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return torch.allclose(a, b.to(a.device), rtol=0.0, atol=atol, equal_nan=True)
    return torch.equal(a, b.to(a.device))


def _max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.dtype != b.dtype:
        return f"dtypes {a.dtype} vs {b.dtype}"
    diff = (a.double() - b.to(a.device).double()).abs().max().item()
    return f"max |difference| {diff:.6g}"


class AliasMap:
    """Which keys of a state_dict name one tensor.

    Parameters
    ----------
    keys
        Every key of the state_dict, in state_dict order.
    groups
        The alias groups; each lists its keys in state_dict order, and the
        groups together hold every key exactly once.

    Notes
    -----
    ``groups`` maps each canonical key (the first key of its group in
    state_dict order) to the tuple of all the group's keys, canonical first.
    """

    def __init__(self, keys: list[str] | tuple[str, ...], groups: list[tuple[str, ...]]):
        self._keys = tuple(keys)
        position = {k: i for i, k in enumerate(self._keys)}
        if len(position) != len(self._keys):
            raise ValueError("alias map: duplicate keys in the key order")
        seen: set[str] = set()
        ordered: list[tuple[str, ...]] = []
        for group in groups:
            if not group:
                raise ValueError("alias map: empty group")
            unknown = [k for k in group if k not in position]
            if unknown:
                raise ValueError(f"alias map: group keys {unknown} are not in the key order")
            twice = seen.intersection(group)
            if twice or len(set(group)) != len(group):
                raise ValueError(f"alias map: keys {sorted(twice) or list(group)} are in more than one group")
            seen.update(group)
            ordered.append(tuple(sorted(group, key=position.__getitem__)))
        missing = [k for k in self._keys if k not in seen]
        if missing:
            raise ValueError(f"alias map: keys {missing[:5]} belong to no group")
        ordered.sort(key=lambda g: position[g[0]])
        self._groups = OrderedDict((g[0], g) for g in ordered)
        self._canonical_of = {k: g[0] for g in ordered for k in g}

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> AliasMap:
        """The alias map of ``state_dict``, found from storage identity."""
        return cls(list(state_dict), find_alias_groups(state_dict))

    @classmethod
    def from_module(cls, module: nn.Module) -> AliasMap:
        """The alias map of ``module.state_dict()``."""
        return cls.from_state_dict(module.state_dict(keep_vars=True))

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key, in state_dict order."""
        return self._keys

    @property
    def groups(self) -> OrderedDict[str, tuple[str, ...]]:
        """Canonical key -> every key of its group (canonical first), state_dict order."""
        return OrderedDict(self._groups)

    @property
    def canonical_keys(self) -> tuple[str, ...]:
        """One key per group, in state_dict order."""
        return tuple(self._groups)

    def canonical_of(self, key: str) -> str:
        """The canonical key of the group that holds ``key``."""
        try:
            return self._canonical_of[key]
        except KeyError:
            raise KeyError(f"{key!r} is not a key of this alias map") from None

    def __len__(self) -> int:
        return len(self._groups)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AliasMap):
            return NotImplemented
        return self._keys == other._keys and self._groups == other._groups

    def __hash__(self) -> int:
        return hash((self._keys, tuple(self._groups.values())))

    def __repr__(self) -> str:
        return f"AliasMap({len(self._keys)} keys, {len(self._groups)} groups)"

    def select(self, predicate: Callable[[str], bool]) -> tuple[str, ...]:
        """Canonical keys of the groups in which any key satisfies ``predicate``."""
        return tuple(c for c, group in self._groups.items() if any(map(predicate, group)))

    def difference(self, other: AliasMap, names: tuple[str, str] = ("this map", "the other")) -> str | None:
        """The first way ``other`` differs from this map, described; None when the two are equal.

        Groups are compared in state_dict order, then the order of every key.
        The description names the first differing group by its canonical key
        and says what differs in it; ``names`` are what it calls this map and
        ``other``.
        """
        mine, theirs = names
        others = list(other._groups.values())
        for position, group in enumerate(self._groups.values()):
            if position == len(others):
                return f"group {group[0]!r} is in {mine} only ({len(self)} groups, {theirs} {len(others)})"
            found = others[position]
            if found == group:
                continue
            here, there = group[0], found[0]
            if here == there:
                only_mine = [k for k in group if k not in found]
                only_theirs = [k for k in found if k not in group]
                pairs = ((only_mine, mine), (only_theirs, theirs))
                parts = [f"keys {keys[:3]} only in {name}" for keys, name in pairs if keys]
                return f"group {here!r}: " + ("; ".join(parts) or f"its keys are in another order in {theirs}")
            where = f"group {position} in state_dict order is {here!r} in {mine} and {there!r} in {theirs}"
            if there not in self._canonical_of:
                return f"{where}; {mine} has no key {there!r}"
            if here not in other._canonical_of:
                return f"{where}; {theirs} has no key {here!r}"
            return f"{where}; {here!r} belongs to group {other._canonical_of[here]!r} there"
        if len(others) > len(self):
            return f"group {others[len(self)][0]!r} is in {theirs} only ({len(others)} groups, {mine} {len(self)})"
        if self._keys != other._keys:
            position = next(i for i, (a, b) in enumerate(zip(self._keys, other._keys)) if a != b)
            key = self._keys[position]
            return (
                f"group {self._canonical_of[key]!r}: key {position} in state_dict order is {key!r} in {mine} "
                f"and {other._keys[position]!r} in {theirs}"
            )
        return None

    def collapse(self, state_dict: Mapping[str, torch.Tensor], *, atol: float = 0.0) -> OrderedDict[str, torch.Tensor]:
        """One tensor per group: canonical key -> the canonical key's tensor.

        Keys of a group need not share storage (a per-key averaged checkpoint
        has lost its sharing), but their values must agree within ``atol``.

        Raises
        ------
        KeyMismatchError
            If ``state_dict`` lacks keys of this map or has keys it does not know.
        AliasConflictError
            If a group's keys hold different values; the message names the
            first disagreeing keys and their largest difference.
        """
        self._check_keys(state_dict.keys(), self._keys, "state_dict")
        canonical: OrderedDict[str, torch.Tensor] = OrderedDict()
        for key, group in self._groups.items():
            value = state_dict[key]
            for alias in group[1:]:
                other = state_dict[alias]
                if other is value or _shares_view(other, value):
                    continue
                if not _values_agree(value, other, atol):
                    raise AliasConflictError(
                        f"aliases {key!r} and {alias!r} hold different values "
                        f"({_max_abs_difference(value, other)}); they name one tensor in the "
                        "network, so pick which key wins (or re-run the per-key arithmetic once per group)"
                    )
            canonical[key] = value
        return canonical

    def expand(self, canonical: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """Every key in state_dict order; the keys of a group map to the same tensor object."""
        self._check_keys(canonical.keys(), self.canonical_keys, "canonical tensors")
        return OrderedDict((k, canonical[self._canonical_of[k]]) for k in self._keys)

    def to_json(self) -> str:
        """The map as a JSON string (see :meth:`from_json`)."""
        return json.dumps(
            {
                "format": _JSON_FORMAT,
                "version": _JSON_VERSION,
                "keys": list(self._keys),
                "groups": [list(g) for g in self._groups.values() if len(g) > 1],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> AliasMap:
        """The map written by :meth:`to_json`; keys in no listed group are singletons."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"alias map: not valid JSON ({error})") from None
        if not isinstance(data, dict) or data.get("format") != _JSON_FORMAT:
            raise ValueError(f"alias map: not a {_JSON_FORMAT} document")
        if data.get("version") != _JSON_VERSION:
            raise ValueError(f"alias map: version {data.get('version')!r} is not supported (expected {_JSON_VERSION})")
        keys, groups = data.get("keys"), data.get("groups")
        if not _is_str_list(keys) or not isinstance(groups, list) or not all(map(_is_str_list, groups)):
            raise ValueError("alias map: 'keys' must be a list of strings and 'groups' a list of lists of strings")
        grouped = {k for g in groups for k in g}
        singletons = [(k,) for k in keys if k not in grouped]
        return cls(keys, [tuple(g) for g in groups] + singletons)

    @staticmethod
    def _check_keys(given: Any, expected: tuple[str, ...], what: str) -> None:
        KeyMismatchError.check(
            given,
            expected,
            what=what,
            against="the alias map",
            fix="build the alias map from the network (same plans, configuration and trainer) the tensors come from",
        )


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
