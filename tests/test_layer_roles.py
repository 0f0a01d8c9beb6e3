"""Layers of differently planned nnU-Net networks matched by role: real 5- and 6-stage 2D plans from nnU-Net's
planner, and properties of the matching on synthetic U-Net key tables."""

from __future__ import annotations

import json

import pytest
from federation_support import pooled_plans, write_site
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr_nnunet.core.aliasing import AliasMap
from flwr_nnunet.demo.synthesis import SITE_STYLES
from flwr_nnunet.nnunet.layer_roles import match_layers, name_keys, role_keys
from flwr_nnunet.nnunet.networks import build_plans_network

LABELS = {"background": 0, "organ": 1, "lesion": 2}


@pytest.fixture(scope="module")
def two_plans(tmp_path_factory):
    """Canonical key -> shape of the 2D networks nnU-Net plans for 64x64 and for 128x128 images."""
    shapes = {}
    for size, style, dataset in ((64, 0, "Dataset601_Small"), (128, 1, "Dataset602_Large")):
        root = tmp_path_factory.mktemp(f"plans{size}")
        site = write_site(root / "site", style, SITE_STYLES[style], (size, size), 3, LABELS)
        plans = pooled_plans([site], dataset, root / "pooled")["plans"]
        network = build_plans_network(plans, json.loads((site / "dataset.json").read_text()), "2d")
        stages = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["n_stages"]
        canonical = AliasMap.from_module(network).collapse(network.state_dict())
        shapes[stages] = {key: tuple(tensor.shape) for key, tensor in canonical.items()}
    return shapes


def deepest_stage(stage: int) -> tuple[str, ...]:
    """Key prefixes of encoder stage ``stage`` and of the decoder stage just above it (decoder index 0)."""
    return (f"encoder.stages.{stage}.", "decoder.stages.0.", "decoder.transpconvs.0.", "decoder.seg_layers.0.")


def test_nnunet_plans_5_and_6_stages_and_roles_pair_equal_resolutions(two_plans):
    assert sorted(two_plans) == [5, 6]
    matching = match_layers({"small": two_plans[5], "large": two_plans[6]})
    pairs = matching.pairs("small", "large")

    # decoder stages, transposed convolutions and heads counted from the output: index j at 5 stages is j + 1 at 6
    assert pairs["decoder.seg_layers.3.weight"] == "decoder.seg_layers.4.weight"  # the full-resolution head
    assert pairs["decoder.stages.0.convs.0.conv.weight"] == "decoder.stages.1.convs.0.conv.weight"
    assert pairs["decoder.transpconvs.3.weight"] == "decoder.transpconvs.4.weight"
    assert all(pairs[key] == key for key in two_plans[5] if key.startswith("encoder."))  # counted from the input
    assert matching.local("small") == ()  # every layer of the shallower network has its counterpart
    assert set(matching.local("large")) == {key for key in two_plans[6] if key.startswith(deepest_stage(5))}
    large_roles, small_roles = role_keys(two_plans[6]), role_keys(two_plans[5])
    assert all(small_roles[a] == large_roles[b] for a, b in pairs.items())


def test_name_matching_pairs_different_resolutions_and_never_the_full_resolution_head(two_plans):
    by_name = match_layers({"small": two_plans[5], "large": two_plans[6]}, name_keys)
    pairs = by_name.pairs("small", "large")
    large_roles, small_roles = role_keys(two_plans[6]), role_keys(two_plans[5])
    misplaced = sorted(a for a, b in pairs.items() if small_roles[a] != large_roles[b])

    # each head's bias is averaged with the other network's head one resolution lower: the 5-stage net's
    # full-resolution head (role -1) with the 6-stage net's half-resolution one (-2)
    assert misplaced == [f"decoder.seg_layers.{j}.bias" for j in range(4)]
    assert small_roles["decoder.seg_layers.3.bias"] == "decoder.seg_layers.-1.bias"
    assert large_roles["decoder.seg_layers.3.bias"] == "decoder.seg_layers.-2.bias"
    # the 6-stage net's full-resolution head is never averaged, nor is any decoder stage (nnU-Net's widths differ
    # at one index), while by role every decoder stage of the 5-stage net is
    assert {"decoder.seg_layers.4.weight", "decoder.seg_layers.4.bias"} <= set(by_name.local("large"))
    assert not [key for key in by_name.shared("small") if key.startswith(("decoder.stages.", "decoder.transpconvs."))]
    by_role = match_layers({"small": two_plans[5], "large": two_plans[6]})
    assert all(key in by_role.shared("small") for key in two_plans[5] if key.startswith("decoder."))


def unet_shapes(features: list[int], classes: int = 3) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a PlainConvUNet's canonical tensors (one conv per stage) with ``features`` per stage."""
    shapes, channels = {}, 1
    for i, width in enumerate(features):
        shapes[f"encoder.stages.{i}.0.convs.0.conv.weight"] = (width, channels, 3, 3)
        shapes[f"encoder.stages.{i}.0.convs.0.norm.weight"] = (width,)
        channels = width
    for j in range(len(features) - 1):
        skip = features[len(features) - 2 - j]
        shapes[f"decoder.transpconvs.{j}.weight"] = (channels, skip, 2, 2)
        shapes[f"decoder.stages.{j}.convs.0.conv.weight"] = (skip, 2 * skip, 3, 3)
        shapes[f"decoder.seg_layers.{j}.weight"] = (classes, skip, 1, 1)
        channels = skip
    return shapes


widths = st.lists(st.sampled_from([4, 8, 16]), min_size=2, max_size=7)


@settings(max_examples=60, deadline=None)
@given(widths, st.sampled_from([4, 8, 16]))
def test_one_stage_deeper_matches_everything_but_its_deepest_stage(features, extra):
    shallow, deep = unet_shapes(features), unet_shapes([*features, extra])
    matching = match_layers({"shallow": shallow, "deep": deep})
    pairs = matching.pairs("shallow", "deep")
    last = len(features) - 2

    assert matching.local("shallow") == ()
    assert pairs[f"decoder.seg_layers.{last}.weight"] == f"decoder.seg_layers.{last + 1}.weight"
    assert set(matching.local("deep")) == {key for key in deep if key.startswith(deepest_stage(len(features)))}


@settings(max_examples=60, deadline=None)
@given(widths, widths)
def test_matching_is_symmetric_complete_and_matches_a_network_with_itself(first, second):
    a, b = unet_shapes(first), unet_shapes(second)
    matching = match_layers({"a": a, "b": b})
    flipped = match_layers({"b": b, "a": a})

    assert {value: key for key, value in matching.pairs("a", "b").items()} == flipped.pairs("b", "a")
    members = [pair for unit in matching.units for pair in unit]
    assert sorted(members) == sorted([("a", k) for k in a] + [("b", k) for k in b])  # each tensor in one unit
    assert all(len({a[k] if m == "a" else b[k] for m, k in unit}) == 1 for unit in matching.units)  # one shape
    itself = match_layers({"a": a, "copy": a})
    assert itself.pairs("a", "copy") == {key: key for key in a} and itself.local("a") == ()


@settings(max_examples=40, deadline=None)
@given(widths, widths)
def test_local_keys_stay_local_and_everything_else_matches_as_before(first, second):
    def norms(key: str) -> bool:
        return ".norm." in key

    a, b = unet_shapes(first), unet_shapes(second)
    shared = match_layers({"a": a, "b": b})
    local = match_layers({"a": a, "b": b}, local=norms)

    assert set(local.local("a")) == set(shared.local("a")) | {key for key in a if norms(key)}
    assert local.pairs("a", "b") == {k: v for k, v in shared.pairs("a", "b").items() if not norms(k)}
    assert match_layers({"a": a, "copy": a}, local=norms).local("copy") == tuple(k for k in a if norms(k))
