"""Which tensors of nnU-Net networks planned differently correspond: layers matched by role, not by name.

nnU-Net's U-Nets (``PlainConvUNet``, ``ResidualEncoderUNet``) number encoder stages from the input but decoder
stages, transposed convolutions and segmentation heads from the bottleneck up, so in a network one stage deeper
``decoder.seg_layers.4`` is no longer the full-resolution head. A *role key* names each tensor by what it does:
encoder keys as they are (counted from the input), the decoder's indexed modules counted from the
full-resolution output as negative indices (``-1`` is the full-resolution stage, ``-2`` the one below, ...),
everything else as it is. Tensors of several networks with one role key and one shape are one *unit*: averaged
together. Torch-free: keys and shapes only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["LayerMatching", "match_layers", "name_keys", "role_keys"]

_FROM_OUTPUT = re.compile(r"^(?P<module>decoder\.(?:stages|transpconvs|seg_layers))\.(?P<index>\d+)(?P<rest>\..*)?$")
"""The decoder's indexed modules: nnU-Net numbers them from the bottleneck up."""

Shapes = Mapping[str, Sequence[int]]
"""Canonical key -> tensor shape of one network."""


def role_keys(keys: Iterable[str]) -> dict[str, str]:
    """Key -> role key for the keys of one network's state_dict.

    ``decoder.stages.<j>``, ``decoder.transpconvs.<j>`` and ``decoder.seg_layers.<j>`` become index
    ``j - n`` (``n``: how many the network has of that module), so ``-1`` is the full-resolution stage in every
    network; every other key (``encoder.stages.<i>``, counted from the input; ``encoder.stem``) is its own role.
    """
    keys = list(keys)
    counts: dict[str, int] = {}
    for key in keys:
        found = _FROM_OUTPUT.match(key)
        if found:
            module = found["module"]
            counts[module] = max(counts.get(module, 0), int(found["index"]) + 1)

    def role(key: str) -> str:
        found = _FROM_OUTPUT.match(key)
        if not found:
            return key
        return f"{found['module']}.{int(found['index']) - counts[found['module']]}{found['rest'] or ''}"

    return {key: role(key) for key in keys}


def name_keys(keys: Iterable[str]) -> dict[str, str]:
    """Key -> itself: matching by name and shape (FednnU-Net's asymmetric mode), for comparison."""
    return {key: key for key in keys}


@dataclass(frozen=True)
class LayerMatching:
    """Every tensor of several networks in exactly one unit.

    Attributes
    ----------
    units
        Each unit is ``((member, key), ...)``: tensors of one role and one shape, at most one per member, members
        in the order the networks were given; a unit of one member is a layer without a match (it stays local).
    """

    units: tuple[tuple[tuple[str, str], ...], ...]

    def shared(self, member: str) -> tuple[str, ...]:
        """``member``'s keys that match at least one other member's."""
        return tuple(key for unit in self.units if len(unit) > 1 for name, key in unit if name == member)

    def local(self, member: str) -> tuple[str, ...]:
        """``member``'s keys that match no other member's."""
        return tuple(key for unit in self.units if len(unit) == 1 for name, key in unit if name == member)

    def pairs(self, first: str, second: str) -> dict[str, str]:
        """``first``'s key -> ``second``'s key, for the units both are in."""
        pairs = {}
        for unit in self.units:
            keys = dict(unit)
            if first in keys and second in keys:
                pairs[keys[first]] = keys[second]
        return pairs


def match_layers(
    networks: Mapping[str, Shapes],
    roles: Callable[[Iterable[str]], dict[str, str]] = role_keys,
    *,
    local: Callable[[str], bool] | None = None,
) -> LayerMatching:
    """The units of ``networks`` (member name -> its canonical keys and shapes): one per role key and shape.

    ``roles`` names each key's role within its network (:func:`role_keys`; :func:`name_keys` matches by name).
    ``local``: keys that match no other network's whatever their role (e.g. ``lambda key: ".norm." in key``: each
    site's normalization layers its own, as in FedBN). Units come in the order of their first tensor (members in
    the given order, keys in each network's order).
    """
    units: dict[tuple[str, tuple[int, ...], str | None], list[tuple[str, str]]] = {}
    for member, shapes in networks.items():
        for key, role in roles(shapes).items():
            alone = member if local is not None and local(key) else None
            units.setdefault((role, tuple(int(s) for s in shapes[key]), alone), []).append((member, key))
    return LayerMatching(tuple(tuple(unit) for unit in units.values()))
