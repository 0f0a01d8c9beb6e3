"""In-place reducers: exact against independent references, aliases stay shared, bad input changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import _trim_mean
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr_nnunet import AliasMap, median_, trimmed_mean_, weighted_mean_
from flwr_nnunet.core.codec import from_array_record, to_array_record
from flwr_nnunet.core.reduce import assign_
from flwr_nnunet.nnunet.networks import STOCK_ARCHITECTURES, build_network


def perturbed(canonical: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A client update: every float tensor moved by noise, counters advanced."""
    generator = torch.Generator().manual_seed(seed)
    update = {}
    for key, value in canonical.items():
        if value.is_floating_point():
            update[key] = value + torch.randn(value.shape, generator=generator, dtype=value.dtype)
        else:
            update[key] = value + torch.randint(0, 50, value.shape, generator=generator, dtype=value.dtype)
    return update


def float64_weighted_mean(updates, weights, key):
    total = sum(weights)
    return sum(u[key].double() * (w / total) for u, w in zip(updates, weights))


@pytest.fixture(scope="module")
def batchnorm_net():
    torch.manual_seed(0)
    return build_network(STOCK_ARCHITECTURES["3d_fullres PlainConvUNet BatchNorm"])


def test_weighted_mean_into_a_real_network_matches_float64_and_keeps_aliases_shared(batchnorm_net):
    net = batchnorm_net
    amap = AliasMap.from_module(net)
    targets = amap.collapse(net.state_dict())
    weights = [3, 1, 7]
    received = [from_array_record(to_array_record(perturbed(targets, seed))) for seed in range(3)]
    pointers = {k: t.data_ptr() for k, t in net.state_dict().items()}

    weighted_mean_(targets, received, weights)

    after = net.state_dict()
    assert {k: t.data_ptr() for k, t in after.items()} == pointers
    assert len({t.untyped_storage().data_ptr() for t in after.values()}) == len(amap)
    for canonical, group in amap.groups.items():
        value = after[canonical]
        reference = float64_weighted_mean(received, weights, canonical)
        if value.is_floating_point():
            assert torch.allclose(value.double(), reference, rtol=1e-6, atol=1e-6 * reference.abs().max().item())
        else:
            assert value.dtype == torch.int64 and value.item() == round(reference.item())
        assert all(after[k] is not None and torch.equal(after[k], value) for k in group)


def test_float64_accumulation_on_request_is_exact_to_float64():
    targets = {"w": torch.zeros(1000, dtype=torch.float64)}
    updates = [{"w": torch.randn(1000, dtype=torch.float64) * 1e6} for _ in range(5)]
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    weighted_mean_(targets, updates, weights, accumulate_dtype=torch.float64)
    assert torch.allclose(targets["w"], float64_weighted_mean(updates, weights, "w"), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters_accumulate_in_float32(dtype):
    n = 64
    updates = [{"w": torch.full((4,), 1.0 + i / 1024, dtype=dtype)} for i in range(n)]
    targets = {"w": torch.zeros(4, dtype=dtype)}
    weighted_mean_(targets, updates, [1] * n)
    reference = float64_weighted_mean(updates, [1] * n, "w").to(dtype)
    assert targets["w"].dtype == dtype and torch.equal(targets["w"], reference)


def test_integer_and_bool_rule_rounds_and_keeps_dtype():
    targets = {"count": torch.tensor(0), "flag": torch.tensor([False, False, True])}
    updates = [
        {"count": torch.tensor(10), "flag": torch.tensor([True, False, False])},
        {"count": torch.tensor(13), "flag": torch.tensor([True, True, False])},
        {"count": torch.tensor(20), "flag": torch.tensor([False, True, False])},
    ]
    weighted_mean_(targets, updates, [1, 1, 2])
    assert targets["count"].dtype == torch.int64 and targets["count"].item() == 16  # 15.75 -> 16
    assert targets["flag"].tolist() == [True, True, False]  # weights .5, .75, 0

    big = 2**25 + 1  # not a float32; exact in float64
    weighted_mean_(targets, [{**u, "count": torch.tensor(big)} for u in updates], [2, 1, 1])
    assert targets["count"].item() == big


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 9),
    st.lists(st.integers(0, 12), min_size=1, max_size=4),
    st.integers(1, 50),
    st.floats(0.0, 0.49),
    st.integers(0, 10_000),
)
def test_median_and_trimmed_mean_match_numpy_and_flower_at_any_chunking(n, shape, chunk, beta, seed):
    generator = torch.Generator().manual_seed(seed)
    updates = [{"w": torch.randn(shape, generator=generator)} for _ in range(n)]
    stacked = np.stack([u["w"].numpy() for u in updates]).astype(np.float64)

    targets = {"w": torch.empty(shape)}
    median_(targets, updates, chunk_elements=chunk)
    assert np.allclose(targets["w"].numpy(), np.median(stacked, axis=0), rtol=1e-6, atol=1e-6)

    targets = {"w": torch.empty(shape)}
    trimmed_mean_(targets, updates, beta, chunk_elements=chunk)
    assert np.allclose(targets["w"].numpy(), _trim_mean(stacked, beta), rtol=1e-6, atol=1e-6)

    weights = [float(i + 1) for i in range(n)]
    targets = {"w": torch.empty(shape)}
    weighted_mean_(targets, updates, weights, chunk_elements=chunk)
    assert np.allclose(targets["w"].numpy(), np.average(stacked, axis=0, weights=weights), rtol=1e-6, atol=1e-6)


def test_non_contiguous_targets_are_written_in_place():
    base = torch.zeros(4, 6)
    targets = {"t": base.t()}
    updates = [{"t": torch.ones(6, 4)}, {"t": torch.full((6, 4), 3.0)}]
    weighted_mean_(targets, updates, [1, 1])
    assert torch.equal(base, torch.full((4, 6), 2.0))


def test_median_of_integers_rounds_half_to_even():
    targets = {"c": torch.tensor([0, 0])}
    weighted = [{"c": torch.tensor([1, 2])}, {"c": torch.tensor([2, 5])}]
    median_(targets, weighted)
    assert targets["c"].tolist() == [2, 4]  # 1.5 -> 2, 3.5 -> 4


def snapshot(tensors):
    return {k: v.clone() for k, v in tensors.items()}


@pytest.mark.parametrize(
    ("updates", "weights", "message"),
    [
        (
            [{"a": torch.ones(3), "b": torch.ones(2)}, {"a": torch.ones(3), "b": torch.ones(3)}],
            [1, 1],
            r"update 1: 'b' has shape \(3,\), expected \(2,\)",
        ),
        ([{"a": torch.ones(3)}], [1], r"update 0: keys differ from the targets: missing 1 keys \(first: \['b'\]\)"),
        ([{"a": torch.ones(3), "b": torch.ones(2), "c": torch.ones(1)}], [1], r"1 unknown keys \(first: \['c'\]\)"),
        ([], [], "no updates"),
        ([{"a": torch.ones(3), "b": torch.ones(2)}], [0], "not all zero"),
        ([{"a": torch.ones(3), "b": torch.ones(2)}], [-1], "not all zero"),
        ([{"a": torch.ones(3), "b": torch.ones(2)}], [float("nan")], "not all zero"),
        ([{"a": torch.ones(3), "b": torch.ones(2)}], [float("inf")], "not all zero"),
        ([{"a": torch.ones(3), "b": torch.ones(2)}], [1, 2], "2 weights for 1 updates"),
    ],
)
def test_bad_updates_raise_and_leave_targets_bit_identical(updates, weights, message):
    targets = {"a": torch.randn(3), "b": torch.randn(2)}
    before = snapshot(targets)
    with pytest.raises(ValueError, match=message):
        weighted_mean_(targets, updates, weights)
    assert all(torch.equal(targets[k], before[k]) for k in targets)


def test_trimmed_mean_rejects_beta_out_of_range():
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean_({"a": torch.zeros(1)}, [{"a": torch.zeros(1)}], 0.5)


def test_assign_loads_received_tensors_keeping_parameter_identity(batchnorm_net):
    net = build_network(STOCK_ARCHITECTURES["3d_fullres PlainConvUNet BatchNorm"])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    amap = AliasMap.from_module(net)
    source = amap.collapse(batchnorm_net.state_dict())
    assign_(amap.collapse(net.state_dict()), from_array_record(to_array_record(source)))
    params = list(net.parameters())
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in params]
    after = net.state_dict()
    assert all(torch.equal(after[k], batchnorm_net.state_dict()[k]) for k in after)


def test_thread_count_does_not_change_the_result_and_torch_threads_are_restored():
    before = torch.get_num_threads()
    generator = torch.Generator().manual_seed(1)
    updates = [
        {"a": torch.randn(5000, generator=generator), "b": torch.randn(7, 3, generator=generator)} for _ in range(4)
    ]
    results = []
    for threads in (1, 3):
        targets = {"a": torch.empty(5000), "b": torch.empty(7, 3)}
        weighted_mean_(targets, updates, [1, 2, 3, 4], chunk_elements=256, num_threads=threads)
        results.append(targets)
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert torch.get_num_threads() == before


def test_an_update_that_is_the_target_itself_is_read_before_it_is_overwritten():
    target = torch.arange(10.0)
    other = torch.full((10,), 4.0)
    weighted_mean_({"w": target}, [{"w": other}, {"w": target}], [1, 1], chunk_elements=3)
    assert torch.equal(target, (torch.arange(10.0) + 4.0) / 2)


@pytest.mark.parametrize("threads", [1, 2])
def test_check_finite_names_exactly_the_groups_whose_result_holds_nan_or_inf(threads):
    big = torch.full((600,), 3e38)  # finite, but a float32 sum of a chunk overflows
    clean = {"big": big, "nan": torch.ones(600), "inf": torch.ones(5), "count": torch.tensor(3)}
    poisoned = {**clean, "nan": torch.ones(600), "inf": torch.ones(5)}
    poisoned["nan"][517] = float("nan")
    poisoned["inf"][0] = float("inf")
    targets = {k: torch.empty_like(v) for k, v in clean.items()}
    found = weighted_mean_(targets, [clean, poisoned], [1, 1], chunk_elements=256, num_threads=threads)
    assert found == []
    found = weighted_mean_(
        targets, [clean, poisoned], [1, 1], chunk_elements=256, num_threads=threads, check_finite=True
    )
    assert found == ["nan", "inf"]
    assert torch.equal(targets["big"], big) and int(targets["count"]) == 3
    found = weighted_mean_(targets, [clean, clean], [1, 1], chunk_elements=256, num_threads=threads, check_finite=True)
    assert found == []
    assert median_(targets, [clean, poisoned, poisoned], chunk_elements=256, check_finite=True) == ["nan", "inf"]
    assert median_(targets, [clean, clean, poisoned, poisoned], chunk_elements=256, check_finite=True) == ["nan", "inf"]
    assert trimmed_mean_(targets, [clean, clean, poisoned], 0.0, chunk_elements=256, check_finite=True) == [
        "nan",
        "inf",
    ]
