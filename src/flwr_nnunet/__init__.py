"""flwr-nnunet: federated nnU-Net with Flower, aggregating each shared tensor once."""

from flwr_nnunet.aggregation import median_, trimmed_mean_, weighted_mean_
from flwr_nnunet.aliasing import (
    AliasConflictError,
    AliasMap,
    KeyMismatchError,
    PartialOverlapError,
    find_alias_groups,
    strip_wrapper_prefixes,
)
from flwr_nnunet.checkpoint import CheckpointError, NnUNetModelFolder
from flwr_nnunet.codec import PayloadError, from_array_record, to_array_record
from flwr_nnunet.family import (
    NnUNetBulyan,
    NnUNetFedMedian,
    NnUNetFedProx,
    NnUNetFedTrimmedAvg,
    NnUNetKrum,
    NnUNetMultiKrum,
    NnUNetQFedAvg,
    strategy_from_name,
)
from flwr_nnunet.privacy import (
    NnUNetDPClientSideAdaptiveClipping,
    NnUNetDPClientSideFixedClipping,
    NnUNetDPServerSideAdaptiveClipping,
    NnUNetDPServerSideFixedClipping,
)
from flwr_nnunet.server_optimizers import NnUNetFedAdagrad, NnUNetFedAdam, NnUNetFedAvgM, NnUNetFedYogi
from flwr_nnunet.site import Site
from flwr_nnunet.site_spec import SiteError, SiteSpec, TrainOptions
from flwr_nnunet.strategy import NnUNetFedAvg, ResumeError

__all__ = [
    "AliasConflictError",
    "AliasMap",
    "CheckpointError",
    "KeyMismatchError",
    "NnUNetBulyan",
    "NnUNetDPClientSideAdaptiveClipping",
    "NnUNetDPClientSideFixedClipping",
    "NnUNetDPServerSideAdaptiveClipping",
    "NnUNetDPServerSideFixedClipping",
    "NnUNetFedAdagrad",
    "NnUNetFedAdam",
    "NnUNetFedAvg",
    "NnUNetFedAvgM",
    "NnUNetFedMedian",
    "NnUNetFedProx",
    "NnUNetFedTrimmedAvg",
    "NnUNetFedYogi",
    "NnUNetKrum",
    "NnUNetModelFolder",
    "NnUNetMultiKrum",
    "NnUNetQFedAvg",
    "PartialOverlapError",
    "PayloadError",
    "ResumeError",
    "Site",
    "SiteError",
    "SiteSpec",
    "TrainOptions",
    "find_alias_groups",
    "from_array_record",
    "median_",
    "strategy_from_name",
    "strip_wrapper_prefixes",
    "to_array_record",
    "trimmed_mean_",
    "weighted_mean_",
]

__version__ = "0.1.0"
