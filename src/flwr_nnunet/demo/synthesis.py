"""The demo's synthetic images: how each site's scanner looks, one (image, label) case, and its files.

Label 1 is an ellipse ("organ"), label 2 a small disc inside it ("lesion");
2D cases are written as PNG, 3D cases as NIfTI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SITE_STYLES", "SITE_STYLES_3D", "SiteStyle", "site_styles", "synthesize_case", "write_case"]


@dataclass(frozen=True)
class SiteStyle:
    """How one site's scanner and population look.

    Parameters
    ----------
    scale, offset
        Stored intensity = ``scale * signal + offset``.
    noise
        Standard deviation of the Gaussian noise (signal units).
    contrast
        Organ minus background intensity (signal units); the lesion adds as much again.
    radius
        (min, max) organ semi-axis as a fraction of the image edge.
    num_training, num_test
        Training cases (a quarter of them, at least one, is the site's validation split) and held-out test cases.
    lesion
        (min, max) lesion radius as a fraction of the organ's shortest semi-axis.
    """

    scale: float
    offset: float
    noise: float
    contrast: float
    radius: tuple[float, float]
    num_training: int
    num_test: int
    lesion: tuple[float, float] = (0.35, 0.5)


SITE_STYLES: tuple[SiteStyle, ...] = (
    SiteStyle(scale=1.0, offset=20.0, noise=10.0, contrast=60.0, radius=(0.16, 0.26), num_training=8, num_test=4),
    SiteStyle(scale=1.8, offset=30.0, noise=16.0, contrast=45.0, radius=(0.11, 0.18), num_training=6, num_test=4),
    SiteStyle(scale=0.6, offset=90.0, noise=12.0, contrast=35.0, radius=(0.20, 0.32), num_training=5, num_test=4),
    SiteStyle(scale=1.3, offset=50.0, noise=12.0, contrast=50.0, radius=(0.14, 0.24), num_training=8, num_test=4),
)
"""The default 2D sites (the demo uses the first ``num_sites`` of them; the fourth serves 4-site experiments)."""

SITE_STYLES_3D: tuple[SiteStyle, ...] = (
    SiteStyle(
        scale=1.0,
        offset=20.0,
        noise=8.0,
        contrast=60.0,
        radius=(0.22, 0.30),
        num_training=8,
        num_test=4,
        lesion=(0.5, 0.65),
    ),
    SiteStyle(
        scale=1.8,
        offset=30.0,
        noise=12.0,
        contrast=50.0,
        radius=(0.18, 0.26),
        num_training=8,
        num_test=4,
        lesion=(0.5, 0.65),
    ),
    SiteStyle(
        scale=0.6,
        offset=90.0,
        noise=10.0,
        contrast=45.0,
        radius=(0.24, 0.32),
        num_training=8,
        num_test=4,
        lesion=(0.5, 0.65),
    ),
)
"""The default 3D sites: the same scanners, larger organs and lesions and less noise than in 2D, so that a
32^3 federation learns both labels in a few minutes on a CPU."""


def site_styles(dims: int) -> tuple[SiteStyle, ...]:
    """The default sites of the 2D (``dims=2``) or the 3D demo."""
    return SITE_STYLES if dims == 2 else SITE_STYLES_3D


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    return np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")


def _ellipsoid(grid: list[np.ndarray], center: np.ndarray, axes: np.ndarray) -> np.ndarray:
    return sum(((g - c) / a) ** 2 for g, c, a in zip(grid, center, axes)) <= 1.0


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], grid: list[np.ndarray]) -> np.ndarray:
    """A slowly varying background (low-frequency cosines), like a bias field."""
    field = np.zeros(shape)
    for _ in range(3):
        frequency = rng.uniform(0.5, 2.0, len(shape)) * 2 * np.pi / np.array(shape)
        field += np.cos(sum(f * g for f, g in zip(frequency, grid)) + rng.uniform(0, 2 * np.pi))
    return field


def synthesize_case(
    rng: np.random.Generator, style: SiteStyle, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """One (image, label) pair of a site: float intensities and uint8 labels of ``shape``."""
    grid = _grid(shape)
    edge = np.array(shape, dtype=np.float64)
    axes = rng.uniform(*style.radius, len(shape)) * edge
    center = edge / 2 + rng.uniform(-0.12, 0.12, len(shape)) * edge
    organ = _ellipsoid(grid, center, axes)
    lesion_radius = rng.uniform(*style.lesion) * axes.min()
    offset = rng.uniform(-0.4, 0.4, len(shape)) * (axes - lesion_radius)
    lesion = _ellipsoid(grid, center + offset, np.full(len(shape), lesion_radius)) & organ
    label = organ.astype(np.uint8) + lesion.astype(np.uint8)
    signal = 10.0 * _smooth_field(rng, shape, grid) + style.contrast * organ + style.contrast * lesion
    signal = signal + rng.normal(0.0, style.noise, shape)
    return style.scale * signal + style.offset, label


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).save(path)


def _write_nifti(path: Path, array: np.ndarray, dtype: type) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array.astype(dtype))
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(path))


def write_case(folder: Path, images: str, labels: str, case: str, pair: tuple[np.ndarray, np.ndarray], dims: int):
    image, label = pair
    (folder / images).mkdir(parents=True, exist_ok=True)
    (folder / labels).mkdir(parents=True, exist_ok=True)
    if dims == 2:
        _write_png(folder / images / f"{case}_0000.png", image)
        _write_png(folder / labels / f"{case}.png", label)
    else:
        _write_nifti(folder / images / f"{case}_0000.nii.gz", image, np.float32)
        _write_nifti(folder / labels / f"{case}.nii.gz", label, np.uint8)
