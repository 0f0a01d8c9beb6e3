"""Compressed updates, the pure tensor part: block quantization, error feedback, the delta records and their checks."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from flwr_nnunet.core.codec import PayloadError, encode_tensor
from flwr_nnunet.core.delta_codec import apply_delta, decode_delta, encode_delta
from flwr_nnunet.core.quantize import (
    MAX_SCALE,
    SCHEMES,
    Quantized,
    dequantize,
    packed_length,
    quantize,
    quantize_with_feedback,
    quantized_problem,
    scheme_named,
)
from flwr_nnunet.nnunet.digests import tensors_sha256

SCHEME_NAMES = sorted(SCHEMES)
finite = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False)
shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)


def values(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    return arrays(np.float32, shape, elements=finite)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(SCHEME_NAMES), data=st.data(), shape=shapes)
def test_round_trip_error_is_bounded_per_block(name, data, shape):
    scheme = SCHEMES[name]
    x = torch.from_numpy(data.draw(values(shape)))
    q = quantize(x, scheme)
    assert quantized_problem(q, scheme, tuple(x.shape)) is None
    y = dequantize(q, scheme, x.shape)
    assert y.shape == x.shape and y.dtype == torch.float32
    if not scheme.blockwise:
        assert torch.equal(y, x.half().float())
        return
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    for start in range(0, x.numel(), scheme.block_size):
        block = flat_x[start : start + scheme.block_size]
        scale = float(q.scales[start // scheme.block_size])
        assert scale == pytest.approx(float(block.abs().max()) / scheme.qmax, rel=1e-6)
        # half a code step, plus float32 rounding of the product and of the scale
        bound = scale / 2 * (1 + 1e-5) + 1e-30
        assert float((flat_y[start : start + scheme.block_size] - block).abs().max()) <= bound


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(SCHEME_NAMES), data=st.data(), shape=shapes)
def test_error_feedback_identity(name, data, shape):
    """dequantized + residual' == update + residual, up to one float32 rounding of that sum."""
    scheme = SCHEMES[name]
    update = torch.from_numpy(data.draw(values(shape)))
    residual = torch.from_numpy(data.draw(values(shape))) / 100
    q, left = quantize_with_feedback(update, residual, scheme)
    intended = update + residual
    sent = dequantize(q, scheme, update.shape)
    ulp = torch.finfo(torch.float32).eps * intended.abs().clamp(min=torch.finfo(torch.float32).tiny)
    assert bool(((sent + left) - intended).abs().le(ulp).all())


@pytest.mark.parametrize("name", SCHEME_NAMES)
def test_error_feedback_telescopes_over_rounds(name):
    """What a sender sent over rounds sums to its true updates, less the last residual."""
    scheme = SCHEMES[name]
    generator = torch.Generator().manual_seed(0)
    residual, sent_sum, true_sum = None, torch.zeros(1000, dtype=torch.float64), torch.zeros(1000, dtype=torch.float64)
    for _ in range(30):
        update = torch.randn(1000, generator=generator) * 0.01
        q, residual = quantize_with_feedback(update, residual, scheme)
        sent_sum += dequantize(q, scheme, update.shape).double()
        true_sum += update.double()
    error = (sent_sum + residual.double() - true_sum).abs().max()
    assert float(error) < 1e-6
    assert float((sent_sum - true_sum).abs().max()) > 1e-7  # the residual is what is missing, not zero


def test_scheme_names():
    assert scheme_named("none") is None
    assert scheme_named("int8-block").bits == 8
    with pytest.raises(ValueError, match="not one of"):
        scheme_named("int3")


@pytest.mark.parametrize("name", SCHEME_NAMES)
def test_non_finite_or_oversized_values_are_refused(name):
    scheme = SCHEMES[name]
    with pytest.raises(ValueError, match="non-finite"):
        quantize(torch.tensor([1.0, float("nan")]), scheme)
    with pytest.raises(ValueError, match="float16|scale"):
        quantize(torch.tensor([MAX_SCALE * 1000.0]), scheme)


def model() -> OrderedDict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return OrderedDict(
        [
            ("conv.weight", torch.randn(8, 4, 3, 3, generator=generator)),
            ("conv.bias", torch.randn(7, generator=generator)),
            ("norm.num_batches_tracked", torch.tensor(5)),
        ]
    )


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(SCHEME_NAMES), seed=st.integers(0, 2**31 - 1))
def test_delta_records_round_trip(name, seed):
    scheme, base = SCHEMES[name], model()
    generator = torch.Generator().manual_seed(seed)
    current = OrderedDict(
        (k, v + 0.01 * torch.randn(v.shape, generator=generator)) for k, v in base.items() if v.is_floating_point()
    )
    current["norm.num_batches_tracked"] = torch.tensor(9)
    delta, residuals = encode_delta(current, base, scheme)
    rebuilt = apply_delta(base, decode_delta(delta, base, scheme))
    assert list(rebuilt) == list(base)
    assert torch.equal(rebuilt["norm.num_batches_tracked"], torch.tensor(9))  # integers are lossless
    for key in ("conv.weight", "conv.bias"):
        change = current[key] - base[key]
        assert torch.allclose(rebuilt[key] + residuals[key], current[key], atol=1e-6)
        assert rebuilt[key].dtype == torch.float32
        assert (
            float((rebuilt[key] - current[key]).abs().max()) <= float(change.abs().max()) / max(scheme.qmax, 1) + 1e-3
        )
    # both sides compute the same bits from the same records
    assert tensors_sha256(rebuilt) == tensors_sha256(apply_delta(base, decode_delta(delta, base, scheme)))


def _replaced(delta, record: int, key: str, array: Array | None):
    records = [OrderedDict(delta[0].items()), OrderedDict(delta[1].items())]
    if array is None:
        del records[record][key]
    else:
        records[record][key] = array
    return ArrayRecord(records[0]), ArrayRecord(records[1])


def hostile_deltas():
    """(what is wrong, the record it is in (0 codes, 1 scales), key, replacement array or None to drop it)."""
    w = "conv.weight"
    blocks = SCHEMES["int8-block"].blocks(8 * 4 * 3 * 3)
    scales = torch.full((blocks,), 0.01)
    return [
        ("missing codes", 0, w, None),
        ("missing scales", 1, w, None),
        ("wrong code dtype", 0, w, encode_tensor(torch.zeros(8, 4, 3, 3, dtype=torch.int16))),
        ("wrong code shape", 0, w, encode_tensor(torch.zeros(8, 4, 9, dtype=torch.int8))),
        ("code -128", 0, w, encode_tensor(torch.full((8, 4, 3, 3), -128, dtype=torch.int8))),
        ("too few scales", 1, w, encode_tensor(scales[:-1])),
        ("too many scales", 1, w, encode_tensor(torch.cat((scales, scales)))),
        ("NaN scale", 1, w, encode_tensor(torch.cat((scales[:-1], torch.tensor([float("nan")]))))),
        ("Inf scale", 1, w, encode_tensor(torch.cat((scales[:-1], torch.tensor([float("inf")]))))),
        ("huge scale", 1, w, encode_tensor(torch.cat((scales[:-1], torch.tensor([MAX_SCALE * 10]))))),
        ("negative scale", 1, w, encode_tensor(-scales)),
        ("float64 scales", 1, w, encode_tensor(scales.double())),
        ("integer buffer as float", 0, "norm.num_batches_tracked", encode_tensor(torch.tensor(5.0))),
        ("unexpected key", 0, "extra", encode_tensor(torch.zeros(1, dtype=torch.int8))),
        ("scales of an integer key", 1, "norm.num_batches_tracked", encode_tensor(torch.ones(1))),
    ]


@pytest.mark.parametrize(("what", "record", "key", "array"), hostile_deltas(), ids=[h[0] for h in hostile_deltas()])
def test_bad_delta_is_refused_with_a_reason(what, record, key, array):
    scheme, base = SCHEMES["int8-block"], model()
    delta, _ = encode_delta(
        OrderedDict((k, v + 0.1) if v.is_floating_point() else (k, v) for k, v in base.items()), base, scheme
    )
    with pytest.raises(PayloadError) as refused:
        decode_delta(_replaced(delta, record, key, array), base, scheme)
    assert key in str(refused.value) or "record" in str(refused.value)


PACKED = [name for name in SCHEME_NAMES if SCHEMES[name].packed]


@pytest.mark.parametrize("name", PACKED)
def test_packed_codes_are_8_in_bits_bytes_first_code_lowest(name):
    scheme = SCHEMES[name]
    codes = torch.tensor([scheme.qmax, -scheme.qmax, 1, 0, 0, 0, 0, 0, -1], dtype=torch.float32)
    packed = quantize(codes, scheme).codes
    assert packed.dtype == torch.uint8 and packed.numel() == packed_length(9, scheme.bits) == 2 * scheme.bits
    word = int.from_bytes(bytes(packed[: scheme.bits].tolist()), "little")
    offset = scheme.qmax + 1
    fields = [(word >> (scheme.bits * i)) & ((1 << scheme.bits) - 1) for i in range(8)]
    assert fields == [offset + scheme.qmax, offset - scheme.qmax, offset + 1] + [offset] * 5


@pytest.mark.parametrize("name", PACKED)
@pytest.mark.parametrize(
    ("what", "change", "expected"),
    [
        ("code -qmax-1", lambda packed: torch.cat((packed[:1] & 0xF0, packed[1:])), "outside"),
        ("padding not zero", lambda packed: torch.cat((packed[:-1], packed[-1:] ^ 0x40)), "padding"),
        ("wrong length", lambda packed: packed[:-1], "bytes of"),
        ("wrong dtype", lambda packed: packed.to(torch.int8), "bytes of"),
    ],
)
def test_bad_packed_codes_are_refused(name, what, change, expected):
    scheme = SCHEMES[name]
    good = quantize(torch.tensor([0.5, -1.0, 0.25]), scheme)
    assert quantized_problem(good, scheme, (3,)) is None
    problem = quantized_problem(Quantized(change(good.codes), good.scales), scheme, (3,))
    assert problem is not None and expected in problem, what


def test_fp16_wrong_dtype_and_inf_are_refused():
    scheme = SCHEMES["fp16"]
    base = OrderedDict(w=torch.zeros(4))
    with pytest.raises(PayloadError, match="float16"):
        decode_delta((ArrayRecord(OrderedDict(w=encode_tensor(torch.zeros(4)))), ArrayRecord()), base, scheme)
    inf = torch.tensor([1.0, math.inf, 0, 0], dtype=torch.float16)
    with pytest.raises(PayloadError, match="NaN or Inf"):
        decode_delta((ArrayRecord(OrderedDict(w=encode_tensor(inf))), ArrayRecord()), base, scheme)
