"""Partial labels: the federation's declared label set, and the share of it each site annotated.

With run-config ``labels`` the federation declares its label set; a site declares the labels it annotated in its
own ``dataset.json`` (``"labels"``): one hospital may have drawn the organ only, another the organ and the lesion.
Every site's labels must then be a subset of the federation's, with the same names and values, and every
federation label must be annotated somewhere. A label a site did not annotate is background in its labels, unless
its ``dataset.json`` says it drew it as another of its labels (``"unannotated_drawn_as": {"lesion": "organ"}``: a
lesion within the organ drawn as organ). A site with a subset trains with the marginal loss
(:mod:`flwr_nnunet.site.marginal_loss`) and is scored on its own labels only. Without a declared set every site
must declare the same labels (a difference is stopped before planning), and region-based datasets always must.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "DRAWN_AS_KEY",
    "UNANNOTATED_DRAWN_AS",
    "annotated_of",
    "check_label_set",
    "drawn_as_values",
    "partial_label_shares",
    "predictions_as_drawn",
    "site_drawn_as",
]

DRAWN_AS_KEY = "flwr_labels_drawn_as"
"""The entry a site's installed ``dataset.json`` gets when it annotated fewer labels than the federation: per
federation label value, the value the site drew it as (itself where annotated). nnU-Net ignores it."""
UNANNOTATED_DRAWN_AS = "unannotated_drawn_as"
"""The entry of a site's raw ``dataset.json`` naming, per label it did not annotate, the label of its own it drew it
as (default background)."""


def check_label_set(labels: Mapping[str, int]) -> dict[str, int]:
    """The federation's declared label set, in value order, once it is nnU-Net's: ``background`` 0 and values
    ``0 .. K``, one name each.

    Raises
    ------
    ValueError
        Naming what is wrong and the form that fits (run-config ``labels = "background=0 organ=1 lesion=2"``).
    """
    values = {str(name): value for name, value in labels.items()}
    form = 'run-config labels = "background=0 organ=1 lesion=2" (every label, its value)'
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values.values()):
        raise ValueError(f"label values must be integers, got {values}; {form}")
    if values.get("background") != 0 or sorted(values.values()) != list(range(len(values))):
        raise ValueError(f"labels {values} must hold background=0 and the consecutive values 0 to K; {form}")
    return dict(sorted(values.items(), key=lambda item: item[1]))


def partial_label_shares(
    site_labels: Mapping[str, Mapping[str, object]],
    federation: Mapping[str, int],
    drawn_as: Mapping[str, Mapping[str, str]] | None = None,
) -> dict:
    """Per site that annotated fewer labels than ``federation``, the names of those it annotated.

    ``drawn_as`` holds each site's ``unannotated_drawn_as`` declaration, if any.

    Raises
    ------
    ValueError
        Naming the site and label when a site declares a label the federation does not, gives a federation label
        another value, declares a region, or draws a label as one it did not annotate; or the federation label no
        site annotated.
    """
    shares, annotated = {}, set()
    for site, labels in site_labels.items():
        own = {}
        for name, value in labels.items():
            if isinstance(value, (list, tuple)):
                raise ValueError(f"{site} declares region {name!r}: partial labels are declared per label")  # noqa: TRY004 - a wrong declaration, reported with the others
            if federation.get(str(name)) != int(value):
                raise ValueError(
                    f"{site} declares label {name!r} = {value}, which the federation's labels {dict(federation)} do "
                    "not hold: fix its dataset.json 'labels', or run-config 'labels'"
                )
            own[str(name)] = int(value)
        site_drawn_as(own, (drawn_as or {}).get(site) or {}, federation, site=site)
        annotated |= set(own)
        if set(own) != set(federation):
            shares[site] = [name for name in federation if name in own]
    missing = [name for name in federation if name not in annotated]
    if missing:
        raise ValueError(f"no site annotated {missing} of the federation's labels: drop them from run-config 'labels'")
    return shares


def site_drawn_as(
    own: Mapping[str, int], drawn_as: Mapping[str, str], federation: Mapping[str, int], *, site: str = "a site"
) -> list[int]:
    """Per federation label value, the value ``site`` drew it as: itself for its ``own`` labels, the value of the
    label ``drawn_as`` names for one it did not annotate, else 0 (background).

    Raises
    ------
    ValueError
        When ``drawn_as`` names a label the site annotated, one outside the federation, or draws one as a label
        the site did not annotate.
    """
    for name, into in drawn_as.items():
        if name not in federation or name in own or into not in own:
            raise ValueError(
                f"{site} declares {UNANNOTATED_DRAWN_AS} {{{name!r}: {into!r}}}: each entry names a federation label "
                f"it did not annotate and one of its own labels {sorted(own)} it drew it as; fix its dataset.json"
            )
    by_value = {value: name for name, value in federation.items()}
    return [
        value if by_value[value] in own else federation.get(drawn_as.get(by_value[value], "background"), 0)
        for value in sorted(by_value)
    ]


def drawn_as_values(dataset_json: Mapping[str, object]) -> list[int] | None:
    """Per federation label value, the value a site drew it as, from its installed ``dataset.json``; None when it
    annotated them all."""
    values = dataset_json.get(DRAWN_AS_KEY)
    return None if values is None else [int(value) for value in values]


def annotated_of(drawn_as: Sequence[int]) -> list[int]:
    """The label values a site annotated: those it drew as themselves."""
    return [value for value, drawn in enumerate(drawn_as) if drawn == value]


def predictions_as_drawn(confusion: np.ndarray, drawn_as: Sequence[int]) -> np.ndarray:
    """A label ``confusion`` (reference label x predicted label) with each predicted label counted as the label the
    site draws it as (a lesion predicted within the organ is organ where the site drew lesions as organ)."""
    merged = np.zeros_like(confusion)
    for predicted, drawn in enumerate(drawn_as):
        merged[:, drawn] += confusion[:, predicted]
    return merged
