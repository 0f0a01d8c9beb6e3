"""Whether every site writes its labels as the others do, judged from voxel counts per label value.

Sites can agree on ``dataset.json``'s ``labels`` and still write other values
into their segmentations (a site that exported 'lesion' as 1 and 'organ' as
2). The names cannot show it; the sites' voxel counts per label value
(``label_voxels`` of :func:`~flwr_nnunet.nnunet.fingerprint.site_survey`)
can hint at it. :func:`label_convention_warnings` names such sites. It only
warns: a real difference between sites (one that sees only large lesions)
can look the same.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from itertools import combinations
from typing import NamedTuple

__all__ = ["MIN_OTHER_SITES", "MIN_VOLUME_RATIO", "label_convention_warnings"]

MIN_VOLUME_RATIO = 1.5
"""Two labels' volumes are ordered at a site only when one is at least this many times the other."""

MIN_OTHER_SITES = 2
"""Other sites that must agree before one site is named (with one other site, neither can be told the odd one)."""

_FIX = "check this site's labelsTr against dataset.json's labels"


def _label_voxels(survey: object) -> dict[int, float] | None:
    """A survey's ``label_voxels`` as ``{value: count}``; None when absent (an older site) or malformed."""
    voxels = survey.get("label_voxels") if isinstance(survey, Mapping) else None
    if not isinstance(voxels, Mapping):
        return None
    try:
        counts = {int(value): float(count) for value, count in voxels.items()}
    except (TypeError, ValueError):
        return None
    return counts if all(math.isfinite(c) and c >= 0 for c in counts.values()) else None


def _label_names(surveys: Mapping[str, object]) -> dict[int, str]:
    """Label value -> name from the surveys' ``labels`` (a region of several values names none of them)."""
    names: dict[int, str] = {}
    for survey in surveys.values():
        labels = survey.get("labels") if isinstance(survey, Mapping) else None
        for name, value in labels.items() if isinstance(labels, Mapping) else ():
            if isinstance(value, (list, tuple)) and len(value) == 1:
                value = value[0]
            if isinstance(value, int) and not isinstance(value, bool):
                names.setdefault(value, str(name))
    return names


class _Reversal(NamedTuple):
    """A pair of labels (a, b) whose volume ratio a site reverses (see :func:`_swap`)."""

    distance: float
    a: int
    b: int
    here: float
    others: list[float]


def _name(value: int, names: Mapping[int, str]) -> str:
    return repr(names[value]) if value in names else f"value {value}"


def _label(value: int, names: Mapping[int, str]) -> str:
    return f"{names[value]!r} ({value})" if value in names else f"value {value}"


def _missing_labels(counts: Mapping[str, Mapping[int, float]], foreground: list[int]) -> list[tuple[str, int]]:
    """``(site, value)`` for each foreground value that only one site lacks, when at least two others have it.

    A site whose counts have no entry for the value (its dataset.json does not declare it: partial labels, see
    :mod:`flwr_nnunet.nnunet.label_sets`) is neither lacking it nor one of the others."""
    missing = []
    for value in foreground:
        declaring = {site: c[value] for site, c in counts.items() if value in c}
        lacking = [site for site, count in declaring.items() if count == 0]
        if len(lacking) == 1 and len(declaring) - 1 >= MIN_OTHER_SITES:
            missing.append((lacking[0], value))
    return missing


def _reversed_pairs(counts: Mapping[str, Mapping[int, float]], foreground: list[int]) -> dict[str, list[_Reversal]]:
    """Per site, every pair of labels whose volume ratio it reverses against all other sites."""
    pairs: dict[str, list[_Reversal]] = {}
    for a, b in combinations(foreground, 2):
        ratios = {site: c.get(a, 0) / c[b] for site, c in counts.items() if c.get(b, 0) > 0}
        logs = {site: math.log(r) for site, r in ratios.items() if 0 < r < math.inf}
        for site in logs:
            distance = _swap(logs, site)
            if distance is not None:
                others = [ratios[other] for other in logs if other != site]
                pairs.setdefault(site, []).append(_Reversal(distance, a, b, ratios[site], others))
    return pairs


def _swap(logs: Mapping[str, float], site: str) -> float | None:
    """How far ``site``'s log volume ratio lies from the others' median when it is reversed against all of them."""
    threshold = math.log(MIN_VOLUME_RATIO)
    others = [r for other, r in logs.items() if other != site]
    here = logs[site]
    if len(others) < MIN_OTHER_SITES or abs(here) < threshold:
        return None
    if all(r >= threshold for r in others) and here < 0 or all(r <= -threshold for r in others) and here > 0:
        return abs(here - statistics.median(others))
    return None


def label_convention_warnings(surveys: Mapping[str, Mapping]) -> dict[str, str]:
    """One line per site whose voxel counts per label contradict every other site's, naming the labels and evidence.

    The rule, over the surveys that carry ``label_voxels`` (others are left out):

    * Swapped labels. For each pair of foreground labels (a, b) (value > 0,
      not ``ignore``), each site where both have voxels has the log volume
      ratio log(v_a / v_b). A site is named when at least
      :data:`MIN_OTHER_SITES` other sites have the ratio, all of them agree on
      its sign with ``|log ratio| >= log(MIN_VOLUME_RATIO)``, and this site's
      ratio has the opposite sign with ``|log ratio| >= log(MIN_VOLUME_RATIO)``.
      Why: volumes differ between sites (populations, scanners, field of
      view), but the order of two clearly different structures (an organ and
      the lesion inside it) rarely does; a site that clearly reverses an order
      every other site clearly agrees on most likely wrote the two values the
      other way round. Pairs of similar size (ratios near 1, whose sign is
      noise) are never evidence, and with a single other site neither can be
      told the odd one. Where several pairs are reversed (a swap of 1 and 2
      also reverses each against a label of size in between), the line names
      the pair farthest from the other sites' median and lists the rest.
    * A missing label. A site with no voxel of a foreground label that every
      other site (at least :data:`MIN_OTHER_SITES`) has.

    Parameters
    ----------
    surveys
        ``{site name: survey}`` as :func:`~flwr_nnunet.nnunet.fingerprint.site_survey` returns them;
        label names come from their ``labels``, ``num_cases`` is quoted when present.

    Returns
    -------
    dict
        ``{site: "<site>: <findings>; check this site's labelsTr against dataset.json's labels"}`` in the
        surveys' order; empty when no site stands out, and for input the rule cannot judge (fewer than three
        sites with counts, zero or malformed counts, missing keys). Never raises on such input.
    """
    counts = {site: c for site, survey in surveys.items() if (c := _label_voxels(survey)) is not None}
    names = _label_names(surveys)
    foreground = sorted({v for c in counts.values() for v in c if v > 0 and names.get(v) != "ignore"})
    findings: dict[str, list[str]] = {site: [] for site in counts}
    for site, value in _missing_labels(counts, foreground):
        cases = surveys[site].get("num_cases")
        where = f"its {cases} training cases" if isinstance(cases, int) else "its training cases"
        findings[site].append(f"no voxel of label {_label(value, names)} in {where}, which every other site has")
    for site, pairs in _reversed_pairs(counts, foreground).items():
        strongest = max(pairs, key=lambda pair: pair.distance)
        a, b, others = strongest.a, strongest.b, strongest.others
        low, high = f"{min(others):.2g}", f"{max(others):.2g}"
        finding = (
            f"labels {_label(a, names)} and {_label(b, names)} look swapped: {_name(a, names)} / {_name(b, names)} "
            f"voxels = {strongest.here:.2g} here, {low if low == high else f'{low} to {high}'} at the other "
            f"{len(others)} sites"
        )
        rest = [f"{_name(p.a, names)} / {_name(p.b, names)}" for p in pairs if p is not strongest]
        findings[site].append(finding + (f" (also reversed here: {', '.join(rest)})" if rest else ""))
    return {site: f"{site}: {'; '.join(found)}; {_FIX}" for site, found in findings.items() if found}
