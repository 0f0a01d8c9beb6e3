"""Canonical tensors <-> Flower ``ArrayRecord``.

Each tensor travels as one ``Array`` holding a complete ``.npy`` file, the
format Flower's own ``Array(ndarray)`` writes, so stock Flower code can read
every record this module writes. Decoding parses the ``.npy`` header itself
(nothing is ever unpickled) and returns tensors that are views of the received
bytes: no copy of the payload is made.

bfloat16, which numpy and Flower's ``Array`` cannot hold, travels as its raw
16-bit patterns in a ``uint16`` payload with ``Array.dtype == "bfloat16"``;
decoding reinterprets the bits, so the round trip is exact.
"""

from __future__ import annotations

import ast
import functools
import io
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from flwr_nnunet.errors import FlwrNnUNetError

__all__ = [
    "CARRIED_DTYPES",
    "HeaderCache",
    "PayloadError",
    "decode_array",
    "encode_tensor",
    "from_array_record",
    "parse_header_text",
    "to_array_record",
]

_NUMPY_STYPE = "numpy.ndarray"
_BFLOAT16 = "bfloat16"
_MAGIC = b"\x93NUMPY"
_HEADER_LENGTH_BYTES = {1: 2, 2: 4, 3: 4}
MAX_HEADER_BYTES = 10000
"""Longest ``.npy`` header decoded: numpy's own ``max_header_size`` (``np.load`` refuses longer ones too)."""
MAX_DIMS = 64
"""numpy's limit on the number of dimensions."""
_MAX_ARRAY_BYTES = (1 << 63) - 1
CARRIED_DTYPES = frozenset(np.dtype(c) for c in ("?", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"))
"""The numpy dtypes payloads may hold (native byte order): what torch holds and the reducers average; bfloat16
travels as ``uint16``. Complex dtypes are refused: no reducer averages them."""


class PayloadError(FlwrNnUNetError, ValueError):
    """A received array is not a well-formed payload of this codec."""


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return header.getvalue()


def encode_tensor(tensor: torch.Tensor) -> Array:
    """One tensor as a Flower ``Array`` (a ``.npy`` payload), its bytes copied once."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    dtype_name = None
    if tensor.dtype == torch.bfloat16:
        tensor, dtype_name = tensor.view(torch.uint16), _BFLOAT16
    array = tensor.numpy()
    if array.dtype not in CARRIED_DTYPES:
        raise TypeError(f"cannot encode a tensor of dtype {tensor.dtype}: not one of the carried dtypes")
    header = _npy_header(array.dtype, tuple(array.shape))
    data = b"".join((header, memoryview(array.reshape(-1)).cast("B")))
    return Array(
        dtype=dtype_name or str(array.dtype),
        shape=tuple(int(n) for n in array.shape),
        stype=_NUMPY_STYPE,
        data=data,
    )


def to_array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Canonical tensors as an ``ArrayRecord``, keys and order kept."""
    return ArrayRecord(OrderedDict((key, encode_tensor(t)) for key, t in tensors.items()))


def _parse_npy_header(data: bytes | memoryview) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, header length) of a ``.npy`` payload."""
    if len(data) < 10 or bytes(data[:6]) != _MAGIC:
        raise PayloadError("not a .npy payload (bad magic string)")
    major = data[6]
    if major not in _HEADER_LENGTH_BYTES:
        raise PayloadError(f".npy format version {major} is not supported")
    width = _HEADER_LENGTH_BYTES[major]
    length = int.from_bytes(bytes(data[8 : 8 + width]), "little")
    start = 8 + width
    if length > MAX_HEADER_BYTES:
        raise PayloadError(
            f".npy header of {length} bytes is longer than {MAX_HEADER_BYTES} (numpy's own max_header_size)"
        )
    if len(data) < start + length:
        raise PayloadError("truncated .npy header")
    return (*_HEADER_CACHE.parse(bytes(data[start : start + length])), start + length)


class HeaderCache:
    """Parsed ``.npy`` headers by their bytes, bounded by bytes, least recently used evicted first.

    Every client repeats each header of the model, so parsing each once pays;
    only headers of at most ``max_entry_bytes`` are kept (real ones are about
    128 bytes), and the kept header bytes never exceed ``max_bytes``.
    """

    def __init__(self, *, max_bytes: int = 1 << 20, max_entry_bytes: int = 4096) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self._entries: OrderedDict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def parse(self, text: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
        """:func:`parse_header_text` of ``text``, from the cache when it is there."""
        with self._lock:
            if text in self._entries:
                self._entries.move_to_end(text)
                return self._entries[text]
        parsed = parse_header_text(text)
        if len(text) <= self.max_entry_bytes:
            with self._lock:
                if text not in self._entries:
                    self._entries[text] = parsed
                    self.nbytes += len(text)
                while self.nbytes > self.max_bytes:
                    evicted, _ = self._entries.popitem(last=False)
                    self.nbytes -= len(evicted)
        return parsed

    def clear(self) -> None:
        """Forget every header."""
        with self._lock:
            self._entries.clear()
            self.nbytes = 0


_HEADER_CACHE = HeaderCache()


def parse_header_text(text: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, fortran_order) of a ``.npy`` header dict, or :class:`PayloadError` saying what is wrong.

    Accepted: exactly the keys ``descr``, ``fortran_order`` and ``shape``; a
    dtype torch holds and the reducers average (:data:`CARRIED_DTYPES`); at most
    64 dimensions (numpy's limit), each a plain non-negative ``int`` (not a
    bool); at most ``2**63 - 1`` bytes in all. Whether the payload has that many
    bytes is checked by the caller before anything is allocated.
    """
    try:
        header = ast.literal_eval(text.decode("latin1"))
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError, TypeError):
        raise PayloadError("unreadable .npy header") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise PayloadError("the .npy header must hold exactly 'descr', 'fortran_order' and 'shape'")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(descr, str):
        raise PayloadError(f"structured dtype {_short(descr)} is not supported")
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError):
        raise PayloadError(f"unknown dtype {_short(descr)}") from None
    if dtype.hasobject or dtype.kind not in "biufc":
        raise PayloadError(f"dtype {_short(descr)} is not a numeric dtype")
    if dtype.newbyteorder("=") not in CARRIED_DTYPES:
        raise PayloadError(
            f"dtype {_short(descr)} is not carried (torch cannot hold it or the reducers cannot average it); "
            f"use one of {sorted(d.name for d in CARRIED_DTYPES)}"
        )
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise PayloadError(f"bad shape {_short(shape)}: it must be a tuple of non-negative ints")
    if len(shape) > MAX_DIMS:
        raise PayloadError(f"shape has {len(shape)} dimensions, more than numpy's limit of {MAX_DIMS}")
    if math.prod(n for n in shape if n) * dtype.itemsize > _MAX_ARRAY_BYTES:
        raise PayloadError(f"shape {_short(shape)} of {dtype} declares more than 2**63 - 1 bytes")
    if not isinstance(fortran, bool):
        raise PayloadError("bad fortran_order")
    return dtype, shape, fortran


def _short(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a hostile header must not make a long message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def decode_array(array: Array, *, key: str = "?") -> torch.Tensor:
    """One ``Array`` as a tensor that views the received bytes (read-only: never write to it).

    Raises
    ------
    PayloadError
        If the payload is not a numeric ``.npy`` file whose byte count, shape
        and dtype agree with each other and with the ``Array``'s fields; the
        message names ``key``.
    """
    with _read_only_views():
        return _decode(array, key)


def from_array_record(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """Every array of ``record`` decoded with :func:`decode_array`, keys and order kept."""
    with _read_only_views():
        return OrderedDict((key, _decode(array, key)) for key, array in record.items())


@contextmanager
def _read_only_views() -> Iterator[None]:
    """Silence torch's warning about tensors over read-only buffers: decoded tensors are only read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        yield


@functools.lru_cache(maxsize=64)
def _declared_dtype(name: str) -> np.dtype:
    return np.dtype(name)


def _decode(array: Array, key: str) -> torch.Tensor:
    try:
        if array.stype != _NUMPY_STYPE:
            raise PayloadError(f"serialization type {array.stype!r} is not {_NUMPY_STYPE!r}")
        data = array.data
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise PayloadError(f"payload is a {type(data).__name__}, not bytes")
        dtype, shape, fortran, offset = _parse_npy_header(data)
        count = math.prod(shape)
        if len(data) - offset != count * dtype.itemsize:
            raise PayloadError(
                f"{len(data) - offset} payload bytes, but shape {_short(shape)} of {dtype} needs {count * dtype.itemsize}"
            )
        if tuple(array.shape) != shape:
            raise PayloadError(f"Array.shape {_short(tuple(array.shape))} differs from the payload's {_short(shape)}")
        if not isinstance(array.dtype, str) or len(array.dtype) > 32:
            raise PayloadError(f"Array.dtype {_short(array.dtype, 40)} is not a dtype name")
        bfloat16 = array.dtype == _BFLOAT16
        if bfloat16 and dtype != np.dtype("<u2"):
            raise PayloadError(f"a bfloat16 payload must hold '<u2' bit patterns, not {dtype.str!r}")
        if not bfloat16 and _declared_dtype(array.dtype) != dtype.newbyteorder("="):
            raise PayloadError(f"Array.dtype {array.dtype!r} differs from the payload's {dtype.str!r}")
    except (PayloadError, TypeError, ValueError) as error:
        raise PayloadError(f"array {_short(key, 200)}: {error}") from None
    values = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    if not dtype.isnative:
        values = values.astype(dtype.newbyteorder("="))
    values = values.reshape(shape[::-1]).T if fortran else values.reshape(shape)
    tensor = torch.from_numpy(values)
    return tensor.view(torch.bfloat16) if bfloat16 else tensor
