"""What one checked instruction asks of a site, and what the site answers.

A :class:`SiteRequest` is a train, evaluate or cross-validation instruction after it
was checked (records, config entries, decoded arrays); :meth:`Site.answer
<flwr_nnunet.site.site.Site.answer>` answers it with a :class:`SiteAnswer`, in the
ClientApp's process or in the site's warm worker (:mod:`flwr_nnunet.site.warm_worker`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from flwr_nnunet.site.spec import SiteSpec, TrainOptions

__all__ = ["KINDS", "SiteAnswer", "SiteRequest"]

KINDS = ("train", "evaluate", "crossval")
"""What a request asks: a training round, an evaluation round, a cross-validation fold's whole-case validation."""


@dataclass(frozen=True)
class SiteRequest:
    """One checked instruction for one site.

    Attributes
    ----------
    kind
        One of :data:`KINDS`.
    run_id
        The Flower run: a site keeps one trainer per run.
    spec
        The site.
    options
        The round's options.
    received
        The server's canonical tensors.
    plans_sha, local_keys, alias_map_json
        The instruction's ``plans-sha256``, ``local-keys`` and ``alias-map`` (see :meth:`Site.train
        <flwr_nnunet.site.site.Site.train>`).
    fold
        The cross-validation fold (kind ``crossval`` only).
    """

    kind: str
    run_id: int
    spec: SiteSpec
    options: TrainOptions
    received: Mapping[str, torch.Tensor] = field(repr=False)
    plans_sha: str | None = None
    local_keys: tuple[str, ...] = ()
    alias_map_json: str | bytes | None = None
    fold: int | None = None


@dataclass(frozen=True)
class SiteAnswer:
    """A site's answer: its metrics, its plans digest, and its tensors (train) or counts (crossval, JSON text)."""

    metrics: dict[str, Any]
    plans_sha: str
    tensors: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)
    counts: str | None = None
