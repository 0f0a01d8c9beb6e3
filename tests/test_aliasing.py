"""AliasMap on real nnU-Net networks, wrapped modules, views, and random tied modules."""

from __future__ import annotations

import io
import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategy_support import tiny_network
from torch import nn

from flwr_nnunet import AliasConflictError, AliasMap, PartialOverlapError, find_alias_groups, strip_wrapper_prefixes
from flwr_nnunet.core.aliasing import KeyMismatchError
from flwr_nnunet.nnunet.networks import STOCK_ARCHITECTURES, build_network

EXPECTED = {  # (keys, groups) of the stock networks: see ../shared/notes/nnunet-2.8.md
    "3d_fullres PlainConvUNet": (292, 108),
    "3d_fullres PlainConvUNet BatchNorm": (496, 174),
    "3d_fullres ResEnc M": (956, 264),
    "2d PlainConvUNet": (396, 148),
}


def distinct_storages(state_dict: dict[str, torch.Tensor]) -> int:
    return len({t.untyped_storage().data_ptr() for t in state_dict.values()})


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def naive_average(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What per-key FedAvg does: one new tensor per key."""
    return {k: (a[k] + b[k]) / 2 if a[k].is_floating_point() else a[k].clone() for k in a}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def stock(request):
    torch.manual_seed(0)
    return request.param, build_network(STOCK_ARCHITECTURES[request.param])


def test_stock_networks_group_counts_equal_distinct_storages(stock):
    name, net = stock
    sd = net.state_dict()
    amap = AliasMap.from_module(net)
    assert (len(amap.keys), len(amap)) == EXPECTED[name]
    assert len(amap) == distinct_storages(sd)
    for canonical, group in amap.groups.items():
        assert group[0] == canonical
        assert len({sd[k].untyped_storage().data_ptr() for k in group}) == 1
    assert amap.canonical_keys == tuple(k for k in sd if amap.canonical_of(k) == k)


def test_stock_expand_collapse_keeps_one_storage_per_group_and_unique_size(stock):
    _, net = stock
    sd = net.state_dict()
    amap = AliasMap.from_state_dict(sd)
    canonical = {k: v.clone() for k, v in amap.collapse(sd).items()}
    full = amap.expand(canonical)
    assert list(full) == list(sd)
    assert distinct_storages(full) == len(amap)
    unique = nbytes(canonical.values())
    assert saved_size(full) <= unique * 1.01
    net.load_state_dict(full)
    reloaded = net.state_dict()
    assert all(torch.equal(reloaded[k], full[k]) for k in sd)


def test_naively_averaged_checkpoint_collapses_when_aliases_agree_and_names_keys_when_not(stock):
    _, net = stock
    sd = net.state_dict()
    other = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    averaged = naive_average(sd, other)
    amap = AliasMap.from_state_dict(sd)
    assert distinct_storages(averaged) == len(averaged)
    assert nbytes(averaged.values()) > 2.7 * nbytes(amap.collapse(sd).values())

    canonical = amap.collapse(averaged)
    assert all(torch.equal(canonical[k], (sd[k] + other[k]) / 2) for k in canonical if sd[k].is_floating_point())
    group = next(g for g in amap.groups.values() if len(g) == 4)
    averaged[group[2]] = averaged[group[2]] + 1e-3
    with pytest.raises(AliasConflictError) as error:
        amap.collapse(averaged)
    assert repr(group[0]) in str(error.value) and repr(group[2]) in str(error.value)
    assert "0.001" in str(error.value)
    assert amap.collapse(averaged, atol=2e-3).keys() == canonical.keys()


def test_json_round_trips_exactly(stock):
    _, net = stock
    amap = AliasMap.from_module(net)
    again = AliasMap.from_json(amap.to_json())
    assert again == amap
    assert again.groups == amap.groups and again.keys == amap.keys
    assert again.to_json() == amap.to_json()


def test_batchnorm_int64_buffers_are_their_own_groups():
    net = build_network(STOCK_ARCHITECTURES["3d_fullres PlainConvUNet BatchNorm"])
    sd = net.state_dict()
    amap = AliasMap.from_state_dict(sd)
    counters = [c for c in amap.canonical_keys if c.endswith("num_batches_tracked")]
    assert counters and all(sd[c].dtype == torch.int64 for c in counters)
    assert all(len(amap.groups[c]) >= 2 for c in counters)  # shared with its .all_modules alias


class Wrapper(nn.Module):
    """DDP-style wrapper: registers the network as ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def test_compiled_and_ddp_wrapped_networks_have_the_same_groups_after_prefix_removal():
    net = tiny_network(norm="batch")
    plain = AliasMap.from_module(net)
    for wrapped in (torch.compile(net), Wrapper(net), Wrapper(torch.compile(net)), torch.compile(Wrapper(net))):
        sd = wrapped.state_dict()
        assert all(k.startswith(("_orig_mod.", "module.")) for k in sd)
        assert len(AliasMap.from_state_dict(sd)) == len(plain)
        assert AliasMap.from_state_dict(strip_wrapper_prefixes(sd)) == plain


def test_strip_wrapper_prefixes_only_strips_a_prefix_every_key_has():
    sd = {"module.a": torch.ones(1), "b": torch.ones(1)}
    assert list(strip_wrapper_prefixes(sd)) == ["module.a", "b"]


def test_tied_weights_in_an_arbitrary_module():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight
            self.register_buffer("scale", torch.ones(3))
            self.inner = nn.Module()
            self.inner.register_buffer("scale_again", self.scale)

    amap = AliasMap.from_module(Tied())
    assert amap.groups == {"embed.weight": ("embed.weight", "head.weight"), "scale": ("scale", "inner.scale_again")}


def test_views_identical_overlapping_and_interleaved():
    base, other = torch.arange(24.0).reshape(4, 6), torch.arange(24.0).reshape(4, 6)
    groups = find_alias_groups({"t": base.t(), "even": other[:, ::2], "again": base.t(), "odd": other[:, 1::2]})
    assert groups == [("t", "again"), ("even",), ("odd",)]
    assert find_alias_groups({"rows01": base[:2], "rows23": base[2:]}) == [("rows01",), ("rows23",)]
    with pytest.raises(PartialOverlapError, match="'all'.*'tail'"):
        find_alias_groups({"all": base, "tail": base[1:]})
    with pytest.raises(PartialOverlapError, match="'f'.*'i'"):
        find_alias_groups({"f": base, "i": base.view(torch.int32)})


def test_zero_element_and_meta_tensors_are_never_grouped():
    base = torch.arange(6.0)
    empty = torch.empty(0)
    meta = torch.empty(3, device="meta")
    sd = {"a": base[2:2], "b": base[2:2], "c": empty, "d": empty, "m": meta, "n": meta}
    assert find_alias_groups(sd) == [(k,) for k in sd]


def test_non_tensor_values_are_rejected_with_a_hint():
    with pytest.raises(TypeError, match=r"'epoch'\] is a int"):
        find_alias_groups({"w": torch.ones(1), "epoch": 3})


def test_collapse_and_expand_name_missing_and_unknown_keys():
    sd = {"a": torch.ones(2), "b": torch.zeros(2)}
    sd["a_alias"] = sd["a"]
    amap = AliasMap.from_state_dict(sd)
    with pytest.raises(KeyMismatchError, match=r"missing 1 keys \(first: \['a_alias'\]\)"):
        amap.collapse({"a": sd["a"], "b": sd["b"]})
    with pytest.raises(KeyMismatchError, match="unknown keys.*'zzz'"):
        amap.expand({"a": sd["a"], "b": sd["b"], "zzz": sd["b"]})
    full = amap.expand({"a": torch.full((2,), 7.0), "b": sd["b"]})
    assert full["a"] is full["a_alias"]


def test_collapse_rejects_aliases_of_different_shape_or_dtype():
    sd = {"a": torch.ones(2)}
    sd["alias"] = sd["a"]
    amap = AliasMap.from_state_dict(sd)
    with pytest.raises(AliasConflictError, match="shapes"):
        amap.collapse({"a": torch.ones(2), "alias": torch.ones(3)})
    with pytest.raises(AliasConflictError, match="dtypes"):
        amap.collapse({"a": torch.ones(2), "alias": torch.ones(2, dtype=torch.float64)})


@pytest.mark.parametrize(
    "document",
    [
        "not json",
        json.dumps({"format": "other"}),
        json.dumps({"format": "flwr-nnunet/alias-map", "version": 99, "keys": [], "groups": []}),
        json.dumps({"format": "flwr-nnunet/alias-map", "version": 1, "keys": ["a"], "groups": [["a", "b"]]}),
        json.dumps(
            {"format": "flwr-nnunet/alias-map", "version": 1, "keys": ["a", "b"], "groups": [["a"], ["a", "b"]]}
        ),
        json.dumps({"format": "flwr-nnunet/alias-map", "version": 1, "keys": "a", "groups": []}),
    ],
)
def test_from_json_rejects_malformed_documents(document):
    with pytest.raises(ValueError, match="alias map"):
        AliasMap.from_json(document)


def test_select_is_alias_consistent():
    net = tiny_network(norm="batch")
    amap = AliasMap.from_module(net)
    norm = amap.select(lambda key: ".norm." in key)
    assert norm
    for canonical in norm:
        assert any(".norm." in k for k in amap.groups[canonical])
    assert all(not any(".norm." in k for k in amap.groups[c]) for c in amap.canonical_keys if c not in norm)


# ---------------------------------------------------------------- property-based


@st.composite
def random_tied_modules(draw):
    """A module of random Linear/BatchNorm layers with random ties, views and buffers."""
    root = nn.Module()
    layers = []
    for i in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            layer = nn.Linear(draw(st.integers(0, 4)), draw(st.integers(1, 4)), bias=draw(st.booleans()))
        else:
            layer = nn.BatchNorm1d(draw(st.integers(1, 4)))
        root.add_module(f"l{i}", layer)
        layers.append(layer)
    for _ in range(draw(st.integers(0, 4))):
        src, dst = draw(st.sampled_from(layers)), draw(st.sampled_from(layers))
        if isinstance(src, nn.Linear) and isinstance(dst, nn.Linear):
            dst.weight = src.weight
    for j in range(draw(st.integers(0, 3))):
        holder = nn.Module()
        source = draw(st.sampled_from(layers))
        kind = draw(st.sampled_from(["same", "transpose", "copy"]))
        w = source.weight.detach()
        view = {"same": w, "transpose": w.t() if w.dim() == 2 else w, "copy": w.clone()}[kind]
        holder.register_buffer("v", view)
        root.add_module(f"holder{j}", holder)
    if draw(st.booleans()):
        parent = nn.Module()
        parent.add_module("inner", root)
        root = parent
    return root


def covered_bytes(t: torch.Tensor) -> set[int]:
    """Addresses of every byte a tensor's elements occupy (the oracle for overlap)."""
    if t.numel() == 0:
        return set()
    size = t.element_size()
    start = t.untyped_storage().data_ptr() + t.storage_offset() * size
    offsets = [sum(i * s for i, s in zip(index, t.stride())) for index in itertools.product(*map(range, t.shape))]
    return {start + o * size + b for o in offsets for b in range(size)}


def view_id(t: torch.Tensor):
    if t.numel() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def expects_partial_overlap(sd: dict[str, torch.Tensor]) -> bool:
    covered = {k: covered_bytes(t) for k, t in sd.items()}
    return any(covered[a] & covered[b] and view_id(sd[a]) != view_id(sd[b]) for a, b in itertools.combinations(sd, 2))


@settings(max_examples=60, deadline=None)
@given(random_tied_modules())
def test_groups_are_exactly_the_identical_views(module):
    sd = module.state_dict()
    if expects_partial_overlap(sd):
        with pytest.raises(PartialOverlapError):
            AliasMap.from_state_dict(sd)
        return
    amap = AliasMap.from_state_dict(sd)
    for a, b in itertools.combinations(sd, 2):
        same = view_id(sd[a]) is not None and view_id(sd[a]) == view_id(sd[b])
        assert (amap.canonical_of(a) == amap.canonical_of(b)) == same, (a, b)
    again = AliasMap.from_json(amap.to_json())
    assert again == amap
    full = amap.expand({k: v.clone() for k, v in amap.collapse(sd).items()})
    assert list(full) == list(sd)
    for group in amap.groups.values():
        assert all(full[k] is full[group[0]] for k in group)
        assert all(torch.equal(full[k], sd[k]) for k in group)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 11), st.integers(1, 12), st.sampled_from([1, 2, 3]), st.booleans()),
        min_size=1,
        max_size=5,
    )
)
def test_overlap_detection_matches_a_byte_level_oracle(specs):
    base = torch.zeros(12, dtype=torch.float32)
    sd = {}
    for i, (start, length, step, as_int) in enumerate(specs):
        view = base[start : start + length : step]
        sd[f"k{i}"] = view.view(torch.int32) if as_int else view
    if expects_partial_overlap(sd):
        with pytest.raises(PartialOverlapError):
            find_alias_groups(sd)
    else:
        groups = find_alias_groups(sd)
        assert sorted(k for g in groups for k in g) == sorted(sd)
        assert all(len({view_id(sd[k]) for k in g}) == 1 for g in groups)


# ------------------------------------------------------------------ difference


@st.composite
def random_alias_maps(draw):
    """An alias map over keys k0..kn in a random state_dict order, with random groups."""
    n = draw(st.integers(1, 12))
    order = draw(st.permutations([f"k{i}" for i in range(n)]))
    labels = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    groups: dict[int, list[str]] = {}
    for key, label in zip(order, labels):
        groups.setdefault(label, []).append(key)
    return AliasMap(order, [tuple(g) for g in groups.values()])


@settings(max_examples=150, deadline=None)
@given(random_alias_maps(), st.data())
def test_difference_is_none_after_a_json_round_trip_and_names_the_group_a_key_left(amap, data):
    assert amap.difference(AliasMap.from_json(amap.to_json())) is None
    assert amap.difference(amap) is None
    shared = [group for group in amap.groups.values() if len(group) > 1]
    if not shared:
        return
    group = data.draw(st.sampled_from(shared))
    removed = data.draw(st.sampled_from(group))
    document = json.loads(amap.to_json())
    for listed in document["groups"]:
        if removed in listed:
            listed.remove(removed)  # the key becomes a group of its own
    other = AliasMap.from_json(json.dumps(document))
    described = amap.difference(other)
    assert described is not None and f"group {group[0]!r}" in described
    if removed != group[0]:
        assert repr(removed) in described  # "keys ['<removed>'] only in this map"
    assert other.difference(amap) is not None


def test_difference_names_the_first_differing_group_of_real_networks():
    instance, batch = AliasMap.from_module(tiny_network()), AliasMap.from_module(tiny_network(norm="batch"))
    assert instance.difference(AliasMap.from_module(tiny_network(seed=1))) is None  # values never matter
    described = instance.difference(batch, names=("the site", "the server"))
    first = next(i for i, (a, b) in enumerate(zip(instance.groups, batch.groups)) if a != b)
    assert described == (
        f"group {first} in state_dict order is {instance.canonical_keys[first]!r} in the site and "
        f"{batch.canonical_keys[first]!r} in the server; the site has no key {batch.canonical_keys[first]!r}"
    )
    assert "running_mean" in described
    document = json.loads(instance.to_json())  # rename one alias of a group on the wire
    group = document["groups"][0]
    renamed = group[1] + ".renamed"
    document["keys"] = [renamed if key == group[1] else key for key in document["keys"]]
    group[1] = renamed
    described = instance.difference(AliasMap.from_json(json.dumps(document)))
    assert described.startswith(f"group {group[0]!r}: keys ") and repr(renamed) in described


def test_difference_of_key_order_and_group_count():
    a = AliasMap(["a", "b", "a2"], [("a", "a2"), ("b",)])
    assert a.difference(AliasMap(["a", "a2", "b"], [("a", "a2"), ("b",)])) == (
        "group 'b': key 1 in state_dict order is 'b' in this map and 'a2' in the other"
    )
    assert AliasMap(["a"], [("a",)]).difference(AliasMap(["a", "b"], [("a",), ("b",)])) == (
        "group 'b' is in the other only (2 groups, this map 1)"
    )
    assert AliasMap(["a", "b"], [("a",), ("b",)]).difference(AliasMap(["a"], [("a",)])) == (
        "group 'b' is in this map only (2 groups, the other 1)"
    )
