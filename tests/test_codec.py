"""Canonical tensors <-> Flower ArrayRecord: exact dtypes, zero-copy decode, malformed payloads."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr_nnunet import PayloadError, from_array_record, to_array_record
from flwr_nnunet.core.codec import decode_array, encode_tensor

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def random_tensor(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 100).to(dtype)
    return torch.randint(0, 100, shape, generator=generator).to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=0, max_size=4),
    st.sampled_from(DTYPES),
    st.booleans(),
    st.integers(0, 1000),
)
def test_round_trip_is_exact_for_every_dtype_and_layout(shape, dtype, transpose, seed):
    tensor = random_tensor(shape, dtype, seed)
    if transpose and tensor.dim() >= 2:
        tensor = tensor.transpose(0, 1)
    decoded = from_array_record(to_array_record({"k": tensor}))["k"]
    assert decoded.dtype == tensor.dtype
    assert decoded.shape == tensor.shape
    assert torch.equal(decoded, tensor)


def test_bfloat16_bits_survive_including_nan_and_subnormals():
    bits = torch.tensor([0x7FC1, 0x0001, 0x8000, 0x3F80, 0xFF80], dtype=torch.int32).to(torch.uint16)
    tensor = bits.view(torch.bfloat16)
    array = encode_tensor(tensor)
    assert array.dtype == "bfloat16"
    assert torch.equal(decode_array(array).view(torch.uint16), bits)


def test_int64_buffer_keeps_dtype_and_value():
    counter = torch.tensor(2**40 + 3, dtype=torch.int64)
    decoded = decode_array(encode_tensor(counter))
    assert decoded.dtype == torch.int64 and decoded.item() == 2**40 + 3


def test_stock_flower_reads_our_records_and_we_read_stock_records():
    tensors = {"w": torch.randn(3, 4), "n": torch.tensor(7)}
    record = to_array_record(tensors)
    assert list(record) == ["w", "n"]
    assert np.array_equal(record["w"].numpy(), tensors["w"].numpy())
    assert record["n"].numpy() == 7
    stock = ArrayRecord({k: v.clone() for k, v in tensors.items()})
    decoded = from_array_record(stock)
    assert all(torch.equal(decoded[k], tensors[k]) for k in tensors)


def test_decoding_views_the_received_bytes_without_copying():
    tensor = torch.randn(64, 32)
    array = encode_tensor(tensor)
    decoded = decode_array(array)
    base = np.frombuffer(array.data, dtype=np.uint8).ctypes.data
    assert base < decoded.data_ptr() < base + len(array.data)
    assert base + len(array.data) - decoded.data_ptr() == tensor.numel() * 4


def test_payload_travels_each_tensor_once():
    tensor = torch.randn(1000)
    array = encode_tensor(tensor)
    assert tensor.numel() * 4 < len(array.data) <= tensor.numel() * 4 + 128


def test_a_non_contiguous_tensor_encodes_as_its_contiguous_copy():
    tensor = torch.randn(5, 6)[:, ::2]
    assert encode_tensor(tensor).data == encode_tensor(tensor.contiguous()).data


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_big_endian_and_fortran_order_payloads_decode_correctly():
    values = np.arange(12, dtype=">f4").reshape(3, 4)
    decoded = decode_array(Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=npy(values)))
    assert torch.equal(decoded, torch.arange(12, dtype=torch.float32).reshape(3, 4))
    fortran = np.asfortranarray(np.arange(12, dtype="<f4").reshape(3, 4))
    decoded = decode_array(Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=npy(fortran)))
    assert torch.equal(decoded, torch.arange(12, dtype=torch.float32).reshape(3, 4))


def good() -> Array:
    return encode_tensor(torch.arange(6, dtype=torch.float32).reshape(2, 3))


def with_data(data: bytes, **fields) -> Array:
    base = good()
    args = {"dtype": base.dtype, "shape": base.shape, "stype": base.stype, "data": data} | fields
    return Array(**args)


class Boom:
    def __reduce__(self):
        return (pytest.fail, ("the payload was unpickled",))


def pickled_object_array() -> bytes:
    array = np.empty(1, dtype=object)
    array[0] = Boom()
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (with_data(b"garbage" * 10), "bad magic"),
        (with_data(good().data[:12]), "truncated .npy header"),
        (with_data(good().data[:-4]), "20 payload bytes, but shape (2, 3)"),
        (with_data(good().data + b"\0" * 4), "28 payload bytes"),
        (with_data(pickled_object_array(), shape=(1,), dtype="object"), "not a numeric dtype"),
        (with_data(pickle.dumps({"a": 1})), "bad magic"),
        (with_data(npy(np.zeros(2, dtype=[("a", "<f4")])), shape=(2,)), "structured dtype"),
        (with_data(npy(np.array(["ab"]))), "not a numeric dtype"),
        (with_data(good().data, shape=(3, 2)), "Array.shape (3, 2) differs"),
        (with_data(good().data, dtype="int32"), "Array.dtype 'int32' differs"),
        (with_data(good().data, dtype="bfloat16"), "must hold '<u2'"),
        (with_data(good().data, stype="torch.Tensor"), "serialization type"),
        (with_data(good().data.replace(b"'descr'", b"'dexcr'")), "exactly 'descr'"),
        (with_data(good().data.replace(b"(2, 3)", b"(2,-3)")), "bad shape"),
        (with_data(good().data.replace(b"'<f4'", b"'<q9'")), "unknown dtype"),
    ],
)
def test_malformed_payloads_raise_a_clear_error_naming_the_key(array, reason):
    with pytest.raises(PayloadError) as error:
        from_array_record(ArrayRecord({"decoder.seg_layers.0.weight": array}))
    message = str(error.value)
    assert "'decoder.seg_layers.0.weight'" in message
    assert reason in message


def raw_npy(header: str, payload: bytes = b"", *, version: int = 1, pad: int = 0) -> bytes:
    """A ``.npy`` file with the literal header ``header`` (plus ``pad`` spaces) and ``payload``, as a hostile
    sender could write it (numpy's writer would refuse most of these)."""
    text = (header + " " * pad).encode("latin1") + b"\n"
    width = 2 if version == 1 else 4
    return b"\x93NUMPY" + bytes([version, 0]) + len(text).to_bytes(width, "little") + text + payload


def hostile(header: str, payload: bytes = b"", *, dtype: str = "float32", shape=(2, 3), **kwargs) -> Array:
    """An ``Array`` whose payload has the literal ``header``."""
    return Array(dtype=dtype, shape=tuple(shape), stype="numpy.ndarray", data=raw_npy(header, payload, **kwargs))


F4 = "{'descr': '<f4', 'fortran_order': False, 'shape': %s}"


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (hostile(F4 % ("(1,) * 65",)), "unreadable .npy header"),
        (hostile(F4 % ("(" + "1, " * 65 + ")",), b"\0" * 4, shape=(1,) * 65), "65 dimensions, more than numpy's limit"),
        (hostile("{'descr': '<f16', 'fortran_order': False, 'shape': (2, 3)}", b"\0" * 96), "not carried"),
        (hostile("{'descr': '<c8', 'fortran_order': False, 'shape': (2, 3)}", b"\0" * 48), "not carried"),
        (hostile("{'descr': '|O', 'fortran_order': False, 'shape': (2, 3)}", b"\0" * 48), "not a numeric dtype"),
        (hostile(F4 % ("(True, 4)",), b"\0" * 16, shape=(1, 4)), "bad shape (True, 4)"),
        (hostile(F4 % ("(2, -3)",), b"\0" * 24), "bad shape"),
        (hostile(F4 % ("(2.0, 3)",), b"\0" * 24), "bad shape"),
        (hostile(F4 % ("(1000000, 1000000)",), b"\0" * 24, shape=(10**6, 10**6)), "needs 4000000000000"),
        (hostile(F4 % (str((2**70, 2**70)),), b"", shape=(2**70, 2**70)), "more than 2**63 - 1 bytes"),
        (hostile(F4 % ("(2, 3)",), b"\0" * 24, pad=20000, version=2), "longer than 10000"),
        (hostile("{'descr': '<f4', 'fortran_order': 1, 'shape': (2, 3)}", b"\0" * 24), "bad fortran_order"),
        (hostile("[1, 2, 3]", b"\0" * 24), "exactly 'descr'"),
        (hostile(F4 % ("(2, 3)",), b"\0" * 24, version=9), "version 9 is not supported"),
        (hostile(F4 % ("(2, 3)",), b"\0" * 24, dtype="x" * 10000), "is not a dtype name"),
    ],
    ids=lambda value: None if isinstance(value, Array) else value[:24],
)
def test_headers_that_pass_a_loose_check_but_fail_later_are_payload_errors(array, reason):
    """Item 1: every such header is a PayloadError at the header check, before anything is allocated."""
    with pytest.raises(PayloadError) as error:
        from_array_record(ArrayRecord({"w": array}))
    assert reason in str(error.value)
    assert len(str(error.value)) < 400


def test_encode_refuses_dtypes_the_codec_does_not_carry():
    with pytest.raises(TypeError, match="not one of the carried dtypes"):
        encode_tensor(torch.zeros(2, dtype=torch.complex64))


def test_the_header_cache_is_bounded_by_bytes():
    """Item 5: 100 payloads with large valid headers (padding) keep nothing alive; small headers are cached once."""
    from flwr_nnunet.core import codec

    codec._HEADER_CACHE.clear()
    for i in range(100):
        decode_array(hostile(F4 % (f"(1, {i + 1})",), b"\0" * 4 * (i + 1), shape=(1, i + 1), pad=9000, version=2))
    assert codec._HEADER_CACHE.nbytes == 0
    for _ in range(3):
        for i in range(100):
            decode_array(encode_tensor(torch.zeros(1, i + 1)))
    assert len(codec._HEADER_CACHE) == 100 and codec._HEADER_CACHE.nbytes < 100 * 128
    small = codec.HeaderCache(max_bytes=1000)
    for i in range(100):
        small.parse((F4 % (f"({i},)",)).encode())
    assert small.nbytes <= 1000 and len(small) < 100
