"""Aggregation across plans by role: one weighted mean per unit, in place in each plans' real nnU-Net network,
unmatched layers left to their own plans, and exactly the plain weighted mean when every site has one plans."""

from __future__ import annotations

import copy

import pytest
import torch

from flwr_nnunet.core.aliasing import AliasMap
from flwr_nnunet.core.reduce import weighted_mean_
from flwr_nnunet.nnunet.layer_roles import match_layers
from flwr_nnunet.nnunet.networks import STOCK_ARCHITECTURES, build_network
from flwr_nnunet.strategy.role_aggregation import align_matched_, role_weighted_mean_

FULL_HEAD = {"small": "decoder.seg_layers.3.weight", "large": "decoder.seg_layers.4.weight"}


def unet(stages: int) -> torch.nn.Module:
    """A narrow 2D PlainConvUNet of nnU-Net's architecture with ``stages`` stages."""
    architecture = copy.deepcopy(STOCK_ARCHITECTURES["2d PlainConvUNet"])
    kwargs = architecture["arch_kwargs"]
    kwargs.update(n_stages=stages, features_per_stage=[4, 8, 16, 16, 16, 16][:stages])
    for name in ("kernel_sizes", "strides", "n_conv_per_stage"):
        kwargs[name] = kwargs[name][:stages]
    kwargs["n_conv_per_stage_decoder"] = kwargs["n_conv_per_stage_decoder"][: stages - 1]
    return build_network(architecture, 1, 3)


def canonical(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return AliasMap.from_module(network).collapse(network.state_dict())


def shapes(model: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in model.items()}


def reply(model: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(t.shape, generator=generator, dtype=t.dtype) for key, t in model.items()}


@pytest.fixture
def two_plans():
    torch.manual_seed(0)
    networks = {"small": unet(5), "large": unet(6)}
    models = {name: canonical(network) for name, network in networks.items()}
    return networks, models, match_layers({name: shapes(model) for name, model in models.items()})


def test_matched_units_get_the_case_weighted_mean_of_both_plans_and_local_layers_their_own(two_plans):
    networks, models, matching = two_plans
    replies = [("small", reply(models["small"], 1), 3.0), ("large", reply(models["large"], 2), 1.0)]
    pointers = {name: {k: t.data_ptr() for k, t in net.state_dict().items()} for name, net in networks.items()}

    assert role_weighted_mean_(models, matching, replies) == []

    small, large = replies[0][1], replies[1][1]
    head = 0.75 * small[FULL_HEAD["small"]] + 0.25 * large[FULL_HEAD["large"]]
    for name in ("small", "large"):
        assert torch.allclose(models[name][FULL_HEAD[name]], head)
        state = networks[name].state_dict()
        assert {k: t.data_ptr() for k, t in state.items()} == pointers[name]  # in place
        assert torch.equal(
            state["decoder.encoder.stages.0.0.convs.0.all_modules.0.weight"],
            state["encoder.stages.0.0.convs.0.conv.weight"],
        )  # aliases see it
    for key in matching.local("large"):  # the 6-stage net's deepest stage matches nothing: its own reply
        assert torch.equal(models["large"][key], large[key])
    deep = "decoder.seg_layers.0.weight"  # 1/16 resolution at 6 stages: never mixed with the 5-stage 1/8 head
    assert deep in matching.local("large") and not torch.equal(models["large"][deep], models["small"][deep])


def test_align_matched_starts_matched_layers_equal_and_leaves_the_rest(two_plans):
    _, models, matching = two_plans
    local = {key: models["large"][key].clone() for key in matching.local("large")}

    align_matched_(models, matching)

    for small_key, large_key in matching.pairs("small", "large").items():
        assert torch.equal(models["small"][small_key], models["large"][large_key])
    assert all(torch.equal(models["large"][key], value) for key, value in local.items())


def test_one_plans_is_the_weighted_mean_bit_for_bit():
    torch.manual_seed(0)
    network, twin = unet(5), unet(5)
    twin.load_state_dict(network.state_dict())
    model, expected = canonical(network), canonical(twin)
    replies = [reply(model, seed) for seed in range(3)]
    weights = [5.0, 2.0, 7.0]

    role_weighted_mean_(
        {"plans": model},
        match_layers({"plans": shapes(model)}),
        [("plans", tensors, weight) for tensors, weight in zip(replies, weights)],
    )
    weighted_mean_(expected, replies, weights)

    assert all(torch.equal(model[key], expected[key]) for key in model)


def test_a_unit_no_reply_covers_is_unchanged_and_a_non_finite_mean_is_named(two_plans):
    _, models, matching = two_plans
    before = {key: value.clone() for key, value in models["large"].items()}
    bad = reply(models["small"], 1)
    bad[FULL_HEAD["small"]][0, 0] = float("inf")

    non_finite = role_weighted_mean_(models, matching, [("small", bad, 1.0)])

    assert non_finite == [f"small:{FULL_HEAD['small']}"]
    assert all(torch.equal(models["large"][key], before[key]) for key in matching.local("large"))
