"""Build nnU-Net networks from plans, and the stock architectures nnU-Net plans."""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
from typing import Any

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

__all__ = [
    "STOCK_ARCHITECTURES",
    "build_network",
    "build_plans_network",
    "build_trainer_network",
    "is_normalization_key",
    "network_channels",
    "trainer_class",
]

_NORM_KWARGS = {"eps": 1e-05, "affine": True}
_NONLIN_KWARGS = {"inplace": True}
_REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def is_normalization_key(key: str) -> bool:
    """Whether ``key`` (a state_dict key of nnU-Net's U-Nets) is a normalization layer's: the ``norm`` of each
    ``ConvDropoutNormReLU`` (its alias ``all_modules.1`` is in the same alias group), in every encoder, decoder and
    residual block."""
    return ".norm." in key


def _architecture(network_class: str, dim: int, features: list[int], per_stage: dict[str, Any], norm: str) -> dict:
    n = len(features)
    kernel = [3] * dim
    stride = [[1] * dim] + [[2] * dim] * (n - 1)
    return {
        "network_class_name": f"dynamic_network_architectures.architectures.unet.{network_class}",
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": features,
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": [kernel] * n,
            "strides": stride,
            **per_stage,
            "conv_bias": True,
            "norm_op": norm.format(dim=dim),
            "norm_op_kwargs": dict(_NORM_KWARGS),
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": dict(_NONLIN_KWARGS),
        },
        "_kw_requires_import": list(_REQ_IMPORT),
    }


_INSTANCE = "torch.nn.modules.instancenorm.InstanceNorm{dim}d"
_BATCH = "torch.nn.modules.batchnorm.BatchNorm{dim}d"
_PLAIN = {"n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5}
_RESENC_M = {"n_blocks_per_stage": [1, 3, 4, 6, 6, 6], "n_conv_per_stage_decoder": [1] * 5}

STOCK_ARCHITECTURES: dict[str, dict] = {
    "3d_fullres PlainConvUNet": _architecture("PlainConvUNet", 3, [32, 64, 128, 256, 320, 320], _PLAIN, _INSTANCE),
    "3d_fullres PlainConvUNet BatchNorm": _architecture(
        "PlainConvUNet", 3, [32, 64, 128, 256, 320, 320], _PLAIN, _BATCH
    ),
    "3d_fullres ResEnc M": _architecture("ResidualEncoderUNet", 3, [32, 64, 128, 256, 320, 320], _RESENC_M, _INSTANCE),
    "2d PlainConvUNet": _architecture(
        "PlainConvUNet",
        2,
        [32, 64, 128, 256, 512, 512, 512, 512],
        {"n_conv_per_stage": [2] * 8, "n_conv_per_stage_decoder": [2] * 7},
        _INSTANCE,
    ),
}
"""The ``architecture`` entries nnU-Net 2.8 plans for typical datasets, by name.

Used by the benchmarks and tests; any plans file's ``configurations[c]['architecture']``
has the same form.
"""


def build_network(
    architecture: dict,
    input_channels: int = 1,
    output_channels: int = 2,
    *,
    deep_supervision: bool = True,
) -> nn.Module:
    """The network nnU-Net builds for a plans ``architecture`` entry (as ``nnUNetTrainer`` does)."""
    architecture = copy.deepcopy(architecture)
    return get_network_from_plans(
        architecture["network_class_name"],
        architecture["arch_kwargs"],
        architecture["_kw_requires_import"],
        input_channels,
        output_channels,
        allow_init=True,
        deep_supervision=deep_supervision,
    )


def trainer_class(name: str) -> type:
    """The nnU-Net trainer class called ``name`` (nnU-Net's own search, then ``nnUNet_extTrainer``).

    Raises
    ------
    ValueError
        If there is no such class.
    """
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with contextlib.redirect_stdout(io.StringIO()):  # the search prints where it looks
        try:
            found = recursive_find_trainer_class_by_name(name)
        except (RuntimeError, AssertionError, ImportError):
            found = None
    if found is None:
        raise ValueError(f"no nnU-Net trainer class {name!r} (add its folder to nnUNet_extTrainer)")
    return found


def _resolve(plans: dict, dataset_json: dict, configuration: str) -> tuple[Any, Any, int, int]:
    """nnU-Net's (plans manager, configuration manager, input channels, segmentation heads) for these plans."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(copy.deepcopy(plans))
    manager = plans_manager.get_configuration(configuration)
    inputs = determine_num_input_channels(plans_manager, manager, dataset_json)
    heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    return plans_manager, manager, inputs, heads


def network_channels(plans: dict, dataset_json: dict, configuration: str) -> tuple[int, int]:
    """(input channels, segmentation heads) of the network for ``configuration``, as nnU-Net derives them."""
    _, _, inputs, heads = _resolve(plans, dataset_json, configuration)
    return inputs, heads


def build_plans_network(
    plans: dict, dataset_json: dict, configuration: str, *, deep_supervision: bool = True
) -> nn.Module:
    """The network of the plans' own ``architecture`` entry (what ``nnUNetTrainer`` builds), no trainer class needed.

    Use it where the trainer class that made a network is not installed; otherwise prefer
    :func:`build_trainer_network`, which honours a trainer's own ``build_network_architecture``.
    """
    _, manager, inputs, heads = _resolve(plans, dataset_json, configuration)
    return build_network(manager.configuration["architecture"], inputs, heads, deep_supervision=deep_supervision)


def build_trainer_network(
    plans: dict,
    dataset_json: dict,
    configuration: str,
    trainer: str = "nnUNetTrainer",
    *,
    deep_supervision: bool = True,
) -> nn.Module:
    """The network the trainer class ``trainer`` builds for these plans (e.g. BatchNorm for ``nnUNetTrainerBN``).

    Input channels and outputs come from ``dataset_json`` as nnU-Net derives them. The server builds
    its global model with this, so its keys and shapes are those of every site's network.

    Raises
    ------
    ValueError
        If there is no trainer class called ``trainer``.
    """
    build = trainer_class(trainer).build_network_architecture
    plans_manager, manager, inputs, heads = _resolve(plans, dataset_json, configuration)
    if "plans_manager" in inspect.signature(build).parameters:
        return build(plans_manager, manager, inputs, heads, deep_supervision)
    return build(
        manager.network_arch_class_name,
        manager.network_arch_init_kwargs,
        manager.network_arch_init_kwargs_req_import,
        inputs,
        heads,
        deep_supervision,
    )
