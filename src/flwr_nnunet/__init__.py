"""flwr-nnunet: federated nnU-Net with Flower, aggregating each shared tensor once.

The public face: the core (alias groups, codec, reducers), the nnU-Net model
folder, the alias-aware strategy family with the types its hooks take, and a
site. Layers: ``core`` < ``nnunet`` < ``strategy`` | ``site`` < ``apps``.

Each name is imported on first use (PEP 562), so that importing one submodule,
as a ClientApp handing its message to a warm site does, does not import torch
and nnU-Net through the package.
"""

from __future__ import annotations

import importlib
from typing import Any

_FACE = {
    "flwr_nnunet.core.aliasing": (
        "AliasConflictError",
        "AliasMap",
        "KeyMismatchError",
        "PartialOverlapError",
        "find_alias_groups",
        "strip_wrapper_prefixes",
    ),
    "flwr_nnunet.core.codec": ("PayloadError", "from_array_record", "to_array_record"),
    "flwr_nnunet.core.reduce": ("median_", "trimmed_mean_", "weighted_mean_"),
    "flwr_nnunet.errors": ("FlwrNnUNetError",),
    "flwr_nnunet.nnunet.model_folder": ("CheckpointError", "NnUNetModelFolder"),
    "flwr_nnunet.site.site": ("Site",),
    "flwr_nnunet.site.spec": ("SiteError", "SiteSpec", "TrainOptions"),
    "flwr_nnunet.strategy.checkpoints": ("ResumeError", "RunCheckpoints"),
    "flwr_nnunet.strategy.fedavg": ("NnUNetFedAvg", "NnUNetFedProx"),
    "flwr_nnunet.strategy.flower_adapted": ("NnUNetBulyan", "NnUNetKrum", "NnUNetMultiKrum", "NnUNetQFedAvg"),
    "flwr_nnunet.strategy.global_model": ("GlobalModel",),
    "flwr_nnunet.strategy.privacy": (
        "AliasAwareDP",
        "NnUNetDPClientSideAdaptiveClipping",
        "NnUNetDPClientSideFixedClipping",
        "NnUNetDPServerSideAdaptiveClipping",
        "NnUNetDPServerSideFixedClipping",
    ),
    "flwr_nnunet.strategy.registry": ("strategy_from_name",),
    "flwr_nnunet.strategy.replies": ("AcceptedReply", "Rejection"),
    "flwr_nnunet.strategy.robust": ("NnUNetFedMedian", "NnUNetFedTrimmedAvg"),
    "flwr_nnunet.strategy.role_fedavg": ("RoleMatchedFedAvg",),
    "flwr_nnunet.strategy.server_optimizers": ("NnUNetFedAdagrad", "NnUNetFedAdam", "NnUNetFedAvgM", "NnUNetFedYogi"),
}
"""The module of each public name."""
_MODULE_OF = {name: module for module, names in _FACE.items() for name in names}

__all__ = sorted(_MODULE_OF)  # noqa: PLE0605 - built from _FACE, the one list of the public names

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The public name ``name``, imported from its module on first use."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'flwr_nnunet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
