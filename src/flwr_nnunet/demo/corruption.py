"""Hospitals whose training labels differ: another convention (labels swapped and partly dropped), or only some
of the labels annotated.

:func:`corrupt_site_labels` rewrites one site's ``labelsTr`` as a hospital with another convention would hold
them, to show what it costs a federation and that the run names it; :func:`annotate_only` as a hospital that drew
some labels only (``bench/site_quality.py``, the tests). Held-out labels (``labelsTs``) stay true.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flwr_nnunet.demo.data import DemoSite

__all__ = ["annotate_only", "corrupt_labels", "corrupt_site_labels"]


def corrupt_labels(
    label: np.ndarray, rng: np.random.Generator, *, swap: tuple[int, int] = (1, 2), drop_fraction: float = 0.5
) -> np.ndarray:
    """``label`` with the values ``swap`` exchanged, then label ``swap[0]`` dropped (set to background) on one side
    of a random straight cut through its voxels that leaves about ``drop_fraction`` of them dropped."""
    a, b = swap
    corrupted = label.copy()
    corrupted[label == a], corrupted[label == b] = b, a
    where = np.argwhere(corrupted == a)
    if where.size and drop_fraction > 0:
        direction = rng.normal(size=label.ndim)
        projection = where @ direction
        cut = np.quantile(projection, drop_fraction)
        dropped = where[projection <= cut]
        corrupted[tuple(dropped.T)] = 0
    return corrupted


def corrupt_site_labels(
    site: DemoSite, file_ending: str, *, swap: tuple[int, int] = (1, 2), drop_fraction: float = 0.5, seed: int = 0
) -> list[str]:
    """Rewrite every training label of ``site`` with :func:`corrupt_labels`; return the cases rewritten.

    Raises
    ------
    ValueError
        For a file ending other than the demo's ``.png`` and ``.nii.gz``.
    """
    rng = np.random.default_rng([seed, 1729])
    folder = site.raw_dataset_folder / "labelsTr"
    cases = sorted(site.training_cases)
    for case in cases:
        _rewrite(
            folder / f"{case}{file_ending}",
            lambda label: corrupt_labels(label, rng, swap=swap, drop_fraction=drop_fraction),
        )
    return cases


def _rewrite(path: Path, change) -> None:
    if path.name.endswith(".png"):
        from PIL import Image

        label = np.asarray(Image.open(path))
        Image.fromarray(change(label).astype(np.uint8)).save(path)
    elif path.name.endswith(".nii.gz"):
        import SimpleITK as sitk

        image = sitk.ReadImage(str(path))
        rewritten = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(image)).astype(np.uint8))
        rewritten.CopyInformation(image)
        sitk.WriteImage(rewritten, str(path))
    else:
        raise ValueError(f"{path}: only the demo's .png and .nii.gz labels can be corrupted")


def annotate_only(
    site: DemoSite,
    file_ending: str,
    labels: dict[str, int],
    *,
    declare: bool = True,
    drawn_as: dict[str, str] | None = None,
) -> list[str]:
    """Rewrite ``site``'s training labels as a hospital that annotated only ``labels`` holds them: every other
    label becomes background, or the label ``drawn_as`` names for it (``{"lesion": "organ"}``: the lesion drawn
    within the organ). With ``declare`` its raw ``dataset.json`` lists only ``labels`` (partial labels, declared)
    and ``drawn_as``; without, it keeps every label (the missing ones silently background or another label: the
    naive federation). Returns the cases rewritten."""
    import json

    from flwr_nnunet.nnunet.label_sets import UNANNOTATED_DRAWN_AS

    folder = site.raw_dataset_folder
    about = json.loads((folder / "dataset.json").read_text())
    into = {about["labels"][name]: labels[kept] for name, kept in (drawn_as or {}).items()}
    lookup = np.array([value if value in labels.values() else into.get(value, 0) for value in range(256)])
    cases = sorted(site.training_cases)
    for case in cases:
        _rewrite(folder / "labelsTr" / f"{case}{file_ending}", lambda label: lookup[label])
    if declare:
        about["labels"] = dict(labels)
        if drawn_as:
            about[UNANNOTATED_DRAWN_AS] = dict(drawn_as)
        (folder / "dataset.json").write_text(json.dumps(about, indent=4))
    return cases
