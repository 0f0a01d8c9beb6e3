"""nnU-Net's five-fold split at every demo site, for a federated cross-validation of the demo.

The demo writes one split per site (fold 0: a quarter of its cases for validation), which its tables are pinned
to. A cross-validation needs folds 0-4 at every site: :func:`write_five_fold_splits` replaces each site's
``splits_final.json`` with the split nnU-Net itself makes for a dataset without one (``generate_crossval_split``,
seed 12345, over the site's training cases), as federated planning also writes it for a site that has none.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["write_five_fold_splits"]


def write_five_fold_splits(demo: Any) -> None:
    """Write nnU-Net's five-fold ``splits_final.json`` into every site's preprocessed dataset folder.

    Raises
    ------
    ValueError
        If a site has fewer than five training cases (five folds need a validation case each).
    """
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    for site in demo.sites:
        cases = sorted(site.training_cases)
        if len(cases) < 5:
            raise ValueError(f"{site.name} has {len(cases)} training cases: a five-fold split needs at least 5")
        splits = generate_crossval_split(cases, seed=12345, n_splits=5)
        site.preprocessed_dataset_folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps([{part: [str(c) for c in split[part]] for part in ("train", "val")} for split in splits])
        (site.preprocessed_dataset_folder / "splits_final.json").write_text(text)
