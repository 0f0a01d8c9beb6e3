"""The package face: every name of the v1 contract stays importable from ``flwr_nnunet``."""

import flwr_nnunet

V1_NAMES = (  # noqa: SIM905 - one string: the pinned contract, not a second copy of __all__
    "AliasConflictError AliasMap CheckpointError KeyMismatchError NnUNetBulyan NnUNetDPClientSideAdaptiveClipping "
    "NnUNetDPClientSideFixedClipping NnUNetDPServerSideAdaptiveClipping NnUNetDPServerSideFixedClipping "
    "NnUNetFedAdagrad NnUNetFedAdam NnUNetFedAvg NnUNetFedAvgM NnUNetFedMedian NnUNetFedProx NnUNetFedTrimmedAvg "
    "NnUNetFedYogi NnUNetKrum NnUNetModelFolder NnUNetMultiKrum NnUNetQFedAvg PartialOverlapError PayloadError "
    "ResumeError Site SiteError SiteSpec TrainOptions find_alias_groups from_array_record median_ "
    "strategy_from_name strip_wrapper_prefixes to_array_record trimmed_mean_ weighted_mean_"
).split()
"""``flwr_nnunet.__all__`` before the package was split into layers (the public contract)."""

HOOK_TYPES = ("AcceptedReply", "AliasAwareDP", "FlwrNnUNetError", "GlobalModel", "Rejection", "RunCheckpoints")


def test_every_v1_name_is_still_exported():
    assert [n for n in V1_NAMES if n not in flwr_nnunet.__all__ or not hasattr(flwr_nnunet, n)] == []


def test_the_hook_types_are_exported():
    assert [n for n in HOOK_TYPES if n not in flwr_nnunet.__all__ or not hasattr(flwr_nnunet, n)] == []


def test_all_names_exactly_what_the_package_offers():
    assert sorted(flwr_nnunet.__all__) == flwr_nnunet.__all__
    assert all(hasattr(flwr_nnunet, n) for n in flwr_nnunet.__all__)


def test_the_hook_types_are_the_ones_in_the_hook_signatures():
    assert flwr_nnunet.NnUNetFedAvg.reply_weight.__annotations__["reply"] == "AcceptedReply"
    assert issubclass(flwr_nnunet.NnUNetDPServerSideFixedClipping, flwr_nnunet.AliasAwareDP)
