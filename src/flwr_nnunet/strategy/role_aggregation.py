"""Aggregation across sites whose plans differ: one global model per plans, each unit of matched layers averaged
once (:mod:`flwr_nnunet.nnunet.layer_roles`).

Every plans has its own global network; its canonical tensors are the targets. A unit's case-weighted mean over
the replies of every plans that has it is written, in place, into one plans' tensor and copied into the others',
so each network's aliases see it. A layer without a match in another plans is averaged over its own plans' sites
only (with one site: the site's own tensor): it stays local to that plans. Each site receives its own plans'
model: exactly the tensors of its network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from flwr_nnunet.core.reduce import weighted_mean_
from flwr_nnunet.nnunet.layer_roles import LayerMatching

__all__ = ["align_matched_", "role_weighted_mean_"]

Models = Mapping[str, Mapping[str, torch.Tensor]]
"""Plans name -> the canonical tensors of its global network (views of its parameters)."""


@torch.no_grad()
def align_matched_(models: Models, matching: LayerMatching) -> None:
    """Give every unit the first member's value in every model (before round 1, so matched layers start equal)."""
    for (first, key), *others in matching.units:
        for member, other in others:
            models[member][other].copy_(models[first][key])


def role_weighted_mean_(
    models: Models,
    matching: LayerMatching,
    replies: Sequence[tuple[str, Mapping[str, torch.Tensor], float]],
) -> list[str]:
    """Write each unit's weighted mean over ``replies`` (plans name, canonical tensors, weight) into ``models``.

    Units whose members are the same set of plans are reduced together
    (:func:`~flwr_nnunet.core.reduce.weighted_mean_`), each unit once; a unit no reply covers is left as it is.
    With one plans this is the weighted mean of every group, bit for bit. Returns ``"<plans>:<key>"`` of the
    units whose mean is not finite (their targets are written all the same).
    """
    batches: dict[tuple[str, ...], list[tuple[tuple[str, str], ...]]] = {}
    for unit in matching.units:
        batches.setdefault(tuple(member for member, _ in unit), []).append(unit)
    non_finite = []
    for members, units in batches.items():
        chosen = [(plans, tensors, weight) for plans, tensors, weight in replies if plans in members]
        if not chosen:
            continue
        first, keyed = members[0], [dict(unit) for unit in units]
        targets = {keys[first]: models[first][keys[first]] for keys in keyed}
        updates = [{keys[first]: tensors[keys[plans]] for keys in keyed} for plans, tensors, _ in chosen]
        bad = weighted_mean_(targets, updates, [weight for _, _, weight in chosen], check_finite=True)
        non_finite += [f"{first}:{key}" for key in bad]
        with torch.no_grad():
            for keys in keyed:
                for member in members[1:]:
                    models[member][keys[member]].copy_(targets[keys[first]])
    return non_finite
