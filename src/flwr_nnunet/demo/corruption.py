"""A hospital whose training labels follow another convention: the demo's labels swapped and partly dropped.

:func:`corrupt_site_labels` rewrites one site's ``labelsTr`` as such a hospital would hold them, to show what it
costs a federation and that the run names it (``bench/site_quality.py``, the tests). Held-out labels
(``labelsTs``) stay true.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flwr_nnunet.demo.data import DemoSite

__all__ = ["corrupt_labels", "corrupt_site_labels"]


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
