"""Leave one site out: the federation of every other site, planned and trained without it, evaluated at it.

A leave-one-dataset-out experiment re-plans without the held-out dataset, as nnU-Net's author asks
(MIC-DKFZ/nnUNet#348): planning from every site and holding one out of training only would let its image sizes,
spacings and intensities shape the plans. In a federation the clean way is also the simple one: the held-out
hospital takes no part in the run (no SuperNode, no statistics, no preprocessing), then predicts its own cases
with the final model (``nnUNetv2_predict`` preprocesses them with the model's plans) and scores them.

For a simulation (a data root of ``site-K`` folders), :func:`federation_without` lays out the data root of that
federation: every other site's raw data linked, renumbered ``site-0 .. site-(N-2)``, nothing else shared, so each
such run plans, preprocesses and trains in folders of its own.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from flwr_nnunet.apps.config_errors import ServerConfigError

__all__ = ["SITES_FILE", "federation_without"]

SITES_FILE = "flwr_sites.json"
"""In the data root :func:`federation_without` makes: which original site each ``site-J`` is, and which is out."""

_SITE = re.compile(r"site-(\d+)")


def federation_without(data_root: Path, held_out: str, target: Path) -> dict[str, str]:
    """The data root of the federation of every site in ``data_root`` but ``held_out``, made in ``target``.

    Each other site's ``nnUNet_raw`` is linked (not copied) into ``target/site-J`` (J renumbered in the original
    order); the held-out site's folder is not touched or referenced. ``target`` is made afresh.

    Returns
    -------
    dict
        ``{"site-J": original site name}``, also written to ``target/flwr_sites.json`` with the held-out site.

    Raises
    ------
    ServerConfigError
        If ``held_out`` is not one of the sites, or fewer than two sites would remain.
    """
    data_root, target = Path(data_root).absolute(), Path(target).absolute()
    sites = sorted(
        (p for p in data_root.iterdir() if _SITE.fullmatch(p.name) and (p / "nnUNet_raw").is_dir()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    names = [p.name for p in sites]
    if held_out not in names:
        raise ServerConfigError(f"leave one site out: {held_out!r} is not a site of {data_root} ({', '.join(names)})")
    kept = [p for p in sites if p.name != held_out]
    if len(kept) < 2:
        raise ServerConfigError(f"leave one site out: {len(kept)} site(s) would remain; a federation needs 2 or more")
    if target.exists():
        shutil.rmtree(target)
    mapping = {}
    for index, site in enumerate(kept):
        folder = target / f"site-{index}"
        folder.mkdir(parents=True)
        (folder / "nnUNet_raw").symlink_to(site / "nnUNet_raw", target_is_directory=True)
        mapping[folder.name] = site.name
    (target / SITES_FILE).write_text(json.dumps({"sites": mapping, "held_out": held_out}, indent=2))
    return mapping
