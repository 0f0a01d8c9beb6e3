"""Partial labels: the federation's declared label set, and the share of it each site annotated.

With run-config ``labels`` the federation declares its label set; a site declares the labels it annotated in its
own ``dataset.json`` (``"labels"``): one hospital may have drawn the organ only, another the organ and the lesion.
Every site's labels must then be a subset of the federation's, with the same names and values, and every
federation label must be annotated somewhere. A site with a subset trains with the marginal loss
(:mod:`flwr_nnunet.site.marginal_loss`) and is scored on its own labels only. Without a declared set every site
must declare the same labels (a difference is stopped before planning), and region-based datasets always must.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["ANNOTATED_KEY", "annotated_values", "check_label_set", "partial_label_shares"]

ANNOTATED_KEY = "flwr_annotated_labels"
"""The entry a site's installed ``dataset.json`` gets when it annotated fewer labels than the federation: the
values it annotated (background included). nnU-Net ignores it."""


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


def partial_label_shares(site_labels: Mapping[str, Mapping[str, object]], federation: Mapping[str, int]) -> dict:
    """Per site that annotated fewer labels than ``federation``, the names of those it annotated.

    Raises
    ------
    ValueError
        Naming the site and label when a site declares a label the federation does not, gives a federation label
        another value, or declares a region; or the federation label no site annotated.
    """
    shares, annotated = {}, set()
    for site, labels in site_labels.items():
        own = {}
        for name, value in labels.items():
            if isinstance(value, (list, tuple)):
                raise ValueError(f"{site} declares region {name!r}: partial labels are declared per label")
            if federation.get(str(name)) != int(value):
                raise ValueError(
                    f"{site} declares label {name!r} = {value}, which the federation's labels {dict(federation)} do "
                    "not hold: fix its dataset.json 'labels', or run-config 'labels'"
                )
            own[str(name)] = int(value)
        annotated |= set(own)
        if set(own) != set(federation):
            shares[site] = [name for name in federation if name in own]
    missing = [name for name in federation if name not in annotated]
    if missing:
        raise ValueError(f"no site annotated {missing} of the federation's labels: drop them from run-config 'labels'")
    return shares


def annotated_values(dataset_json: Mapping[str, object]) -> Sequence[int] | None:
    """The label values a site annotated, from its installed ``dataset.json``; None when it annotated them all."""
    values = dataset_json.get(ANNOTATED_KEY)
    return None if values is None else sorted(int(value) for value in values)
