"""flwr-nnunet: federated nnU-Net with Flower, aggregating each shared tensor once.

The public face: the core (alias groups, codec, reducers), the nnU-Net model
folder, the alias-aware strategy family with the types its hooks take, and a
site. Layers: ``core`` < ``nnunet`` < ``strategy`` | ``site`` < ``apps``.
"""

from flwr_nnunet.core.aliasing import (
    AliasConflictError,
    AliasMap,
    KeyMismatchError,
    PartialOverlapError,
    find_alias_groups,
    strip_wrapper_prefixes,
)
from flwr_nnunet.core.codec import PayloadError, from_array_record, to_array_record
from flwr_nnunet.core.reduce import median_, trimmed_mean_, weighted_mean_
from flwr_nnunet.errors import FlwrNnUNetError
from flwr_nnunet.nnunet.model_folder import CheckpointError, NnUNetModelFolder
from flwr_nnunet.site.site import Site
from flwr_nnunet.site.spec import SiteError, SiteSpec, TrainOptions
from flwr_nnunet.strategy.checkpoints import ResumeError, RunCheckpoints
from flwr_nnunet.strategy.fedavg import NnUNetFedAvg, NnUNetFedProx
from flwr_nnunet.strategy.flower_adapted import NnUNetBulyan, NnUNetKrum, NnUNetMultiKrum, NnUNetQFedAvg
from flwr_nnunet.strategy.global_model import GlobalModel
from flwr_nnunet.strategy.privacy import (
    AliasAwareDP,
    NnUNetDPClientSideAdaptiveClipping,
    NnUNetDPClientSideFixedClipping,
    NnUNetDPServerSideAdaptiveClipping,
    NnUNetDPServerSideFixedClipping,
)
from flwr_nnunet.strategy.registry import strategy_from_name
from flwr_nnunet.strategy.replies import AcceptedReply, Rejection
from flwr_nnunet.strategy.robust import NnUNetFedMedian, NnUNetFedTrimmedAvg
from flwr_nnunet.strategy.server_optimizers import NnUNetFedAdagrad, NnUNetFedAdam, NnUNetFedAvgM, NnUNetFedYogi

__all__ = [
    "AcceptedReply",
    "AliasAwareDP",
    "AliasConflictError",
    "AliasMap",
    "CheckpointError",
    "FlwrNnUNetError",
    "GlobalModel",
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
    "Rejection",
    "ResumeError",
    "RunCheckpoints",
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
