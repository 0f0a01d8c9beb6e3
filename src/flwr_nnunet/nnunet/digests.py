"""The project's digests: canonical JSON (plans, run configs) and tensors.

Every sha256 the project stores or compares is computed here, so a digest
written by one part (a checkpoint, the ``plans-sha256`` config key) is always
reproduced bit for bit by another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["canonical_json_sha256", "plans_sha256", "tensors_sha256"]


def canonical_json_sha256(obj: Any, *, default: Callable[[Any], Any] | None = None) -> str:
    """The sha256 hex digest of ``obj`` as canonical JSON.

    Canonical means: keys sorted at every level, no whitespace, ASCII only; so
    the digest does not depend on dict key order or on how a file was
    formatted, and changes when any value does. ``default`` is passed to
    :func:`json.dumps` for values JSON cannot encode (``str`` stringifies
    them); without it such a value raises ``TypeError``.
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=default)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def plans_sha256(plans: dict) -> str:
    """A digest of an nnU-Net plans dict that does not depend on key order, whitespace or ``dataset_name``.

    Server and sites compare it (config key ``plans-sha256``) to make sure every
    site trains the architecture and preprocessing the server aggregates.
    ``dataset_name`` is left out: a site keeps the federation's plans under its
    own dataset name (``Dataset517_Liver`` at one site, ``Dataset003_Liver`` at
    another), and nnU-Net finds the site's folders by it, so the same plans
    carry different names at different sites.
    """
    return canonical_json_sha256({key: value for key, value in plans.items() if key != "dataset_name"})


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """A digest of tensors: keys, dtypes, shapes and bytes, in order."""
    digest = hashlib.sha256()
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()
