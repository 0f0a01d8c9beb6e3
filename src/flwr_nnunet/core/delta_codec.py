"""Compressed model deltas <-> Flower ``ArrayRecord``s, both directions of a round.

A delta from a base model travels as two records: ``arrays`` holds, per canonical key, the compressed codes of a
floating tensor's change (:mod:`flwr_nnunet.core.quantize`) or an integer tensor's new value as it is (lossless),
and :data:`SCALES_RECORD` holds the float32 block scales of each floating key (blockwise modes). Every array is a
``.npy`` payload of :mod:`flwr_nnunet.core.codec` (stock Flower reads them; nothing is unpickled), and decoding
checks block counts, shapes, dtypes and scales before any value is used.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord

from flwr_nnunet.core.codec import PayloadError, decode_array, encode_tensor
from flwr_nnunet.core.quantize import Quantized, Scheme, dequantize, quantize_with_feedback, quantized_problem

__all__ = [
    "BASE_KEY",
    "COMPRESSION_KEY",
    "MODEL_KEY",
    "SCALES_RECORD",
    "CompressedDelta",
    "apply_delta",
    "decode_delta",
    "encode_delta",
]

SCALES_RECORD = "scales"
"""The ``RecordDict`` entry holding the block scales of a compressed delta."""
COMPRESSION_KEY = "compression"
"""Config key: the scheme of a compressed message (run-config ``compression``)."""
BASE_KEY = "base-sha256"
"""Config key: the digest of the model a delta starts from (an instruction's, or the one a reply's update is from)."""
MODEL_KEY = "model-sha256"
"""Config key of an instruction: the digest of the model the site holds once it applied the delta."""

CompressedDelta = tuple[ArrayRecord, ArrayRecord]
"""(codes and lossless values, block scales): what a compressed delta puts in a ``RecordDict``."""


def encode_delta(
    current: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    scheme: Scheme,
    residuals: Mapping[str, torch.Tensor] | None = None,
) -> tuple[CompressedDelta, OrderedDict[str, torch.Tensor]]:
    """``current - base`` compressed key by key (floating keys, with error feedback), and the new residuals.

    Integer tensors travel as ``current``'s values. ``residuals`` (floating keys, float32) are what earlier
    deltas left out; the returned ones are what this delta leaves out.

    Raises
    ------
    ValueError
        If a floating change is not finite or does not fit the scheme (see :func:`~flwr_nnunet.core.quantize.quantize`).
    """
    codes, scales, left = OrderedDict(), OrderedDict(), OrderedDict()
    for key, tensor in current.items():
        if not tensor.is_floating_point():
            codes[key] = encode_tensor(tensor)
            continue
        change = tensor.detach().to("cpu", torch.float32) - base[key].detach().to("cpu", torch.float32)
        try:
            quantized, left[key] = quantize_with_feedback(change, None if residuals is None else residuals[key], scheme)
        except ValueError as error:
            raise ValueError(f"{key!r}: {error}") from None
        codes[key] = encode_tensor(quantized.codes)
        if quantized.scales is not None:
            scales[key] = encode_tensor(quantized.scales)
    return (ArrayRecord(codes), ArrayRecord(scales)), left


def decode_delta(
    delta: CompressedDelta, reference: Mapping[str, torch.Tensor], scheme: Scheme
) -> OrderedDict[str, torch.Tensor]:
    """The float32 change of every floating key of ``reference`` and the value of every integer key, checked.

    Raises
    ------
    PayloadError
        If the keys differ from ``reference``'s, or an array is not a well-formed payload, not of the scheme's
        dtype, shape and block count, or its scales are not finite and in ``[0, MAX_SCALE]``; the message names
        the key.
    """
    codes, scales = delta
    floating = [key for key, like in reference.items() if like.is_floating_point()]
    _same_keys(codes, list(reference), "arrays")
    _same_keys(scales, floating if scheme.blockwise else [], SCALES_RECORD)
    decoded = OrderedDict()
    for key, like in reference.items():
        value = decode_array(codes[key], key=key)
        if not like.is_floating_point():
            if value.dtype != like.dtype or value.shape != like.shape:
                raise PayloadError(
                    f"array {key!r}: {value.dtype} {tuple(value.shape)} where the model holds {like.dtype} "
                    f"{tuple(like.shape)} (integer tensors travel as they are)"
                )
            decoded[key] = value
            continue
        quantized = Quantized(value, decode_array(scales[key], key=key) if scheme.blockwise else None)
        problem = quantized_problem(quantized, scheme, tuple(like.shape))
        if problem:
            raise PayloadError(f"array {key!r} ({scheme.name}): {problem}")
        decoded[key] = dequantize(quantized, scheme, like.shape)
    return decoded


def _same_keys(record: ArrayRecord, keys: list[str], name: str) -> None:
    if set(record.keys()) != set(keys):
        missing = [k for k in keys if k not in record][:3]
        extra = [k for k in record if k not in set(keys)][:3]
        raise PayloadError(
            f"record {name!r} holds {len(record)} arrays where {len(keys)} are expected (missing {missing}, "
            f"unexpected {extra})"
        )


def apply_delta(
    base: Mapping[str, torch.Tensor], decoded: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """``base`` plus the decoded change of each floating key (computed in float32 on the CPU, then cast to the
    key's dtype), and the decoded value of each integer key: new CPU tensors, ``base``'s keys and order."""
    result = OrderedDict()
    for key, tensor in base.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            result[key] = (tensor.to(torch.float32) + decoded[key]).to(tensor.dtype)
        else:
            result[key] = decoded[key].clone()
    return result
