"""Lossy compression of floating-point updates: 16-bit, and blockwise 8-, 4- and 3-bit with a scale per block.

A tensor is flattened in C order and cut into blocks of ``block_size`` values (the last one zero-padded); each
block gets one float32 scale, its largest magnitude over the largest code (absmax), and each value the nearest
integer code in ``[-qmax, qmax]`` (codes of fewer than 8 bits packed, 8 codes in ``bits`` bytes). Dequantizing
multiplies code and scale in float32, so the sender and the receiver compute bit-identical values from the same
codes.

Error feedback: :func:`quantize_with_feedback` sends ``intended = update + residual`` and keeps
``residual' = intended - dequantized``, both in float32; ``dequantized + residual'`` equals ``intended`` up to one
float32 rounding of that sum, so the sum of the dequantized updates a sender sent over rounds equals the sum of
its true updates minus its last residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "MAX_SCALE",
    "SCHEMES",
    "Quantized",
    "Scheme",
    "dequantize",
    "packed_length",
    "quantize",
    "quantize_with_feedback",
    "quantized_problem",
    "scheme_named",
]

MAX_SCALE = 1e6
"""The largest block scale accepted: a weight moving by more than ``MAX_SCALE * qmax`` in one round is no update."""


@dataclass(frozen=True)
class Scheme:
    """One compression mode.

    Attributes
    ----------
    name
        The run-config value (``fp16``, ``int8-block``, ``int4-block``, ``int3-block``).
    bits
        Bits per value: 16 (float16, no scales), 8, 4 or 3 (integer codes with a float32 scale per block).
    block_size
        Values per scale (blockwise modes).
    """

    name: str
    bits: int
    block_size: int = 0

    @property
    def blockwise(self) -> bool:
        """Whether values are integer codes with a scale per block."""
        return self.bits < 16

    @property
    def qmax(self) -> int:
        """The largest code magnitude (codes are symmetric: ``-qmax`` to ``qmax``)."""
        return (1 << (self.bits - 1)) - 1

    def blocks(self, numel: int) -> int:
        """Scales of a tensor of ``numel`` values."""
        return math.ceil(numel / self.block_size) if self.blockwise else 0

    @property
    def packed(self) -> bool:
        """Whether the codes are packed, 8 in ``bits`` bytes (fewer than 8 bits a code)."""
        return self.bits < 8


SCHEMES: dict[str, Scheme] = {
    scheme.name: scheme
    for scheme in (
        Scheme("fp16", 16),
        Scheme("int8-block", 8, 256),
        Scheme("int4-block", 4, 128),
        Scheme("int3-block", 3, 128),
    )
}
"""Every lossy mode by its run-config name (``none`` sends float32 as it is)."""


def scheme_named(name: str) -> Scheme | None:
    """The scheme of run-config ``compression`` = ``name`` (None for ``none``).

    Raises
    ------
    ValueError
        If ``name`` is not ``none`` nor one of :data:`SCHEMES`.
    """
    if name == "none":
        return None
    if name not in SCHEMES:
        raise ValueError(f"compression {name!r} is not one of {['none', *SCHEMES]}")
    return SCHEMES[name]


@dataclass(frozen=True)
class Quantized:
    """One tensor's compressed values.

    Attributes
    ----------
    codes
        ``float16`` in the tensor's shape (16-bit), ``int8`` in its shape (8-bit), or ``uint8`` of
        :func:`packed_length` bytes (fewer bits): each 8 codes, stored as ``code + qmax + 1`` in ``bits`` bits
        each, first code lowest, as one little-endian word of ``bits`` bytes; the last 8 padded with the zero code.
    scales
        ``float32`` of one scale per block (blockwise modes), else None.
    """

    codes: torch.Tensor
    scales: torch.Tensor | None = None


def packed_length(numel: int, bits: int) -> int:
    """Bytes of ``numel`` packed codes of ``bits`` bits."""
    return bits * math.ceil(numel / 8)


def _fields(bits: int) -> list[tuple[int, int, int, int]]:
    """Where each of a group's 8 codes lies: (code, byte, shift in it, bits spilling into the next byte)."""
    return [(i, bits * i // 8, bits * i % 8, max(0, bits * i % 8 + bits - 8)) for i in range(8)]


def _pack(codes: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Flat integer ``codes`` (in ``[-qmax, qmax]``) packed as :class:`Quantized` describes."""
    zero = scheme.qmax + 1
    stored = (codes + zero).to(torch.uint8)
    groups = torch.cat((stored, stored.new_full((-stored.numel() % 8,), zero))).view(-1, 8)
    packed = torch.zeros((groups.shape[0], scheme.bits), dtype=torch.uint8)
    for code, byte, shift, spill in _fields(scheme.bits):
        packed[:, byte] |= groups[:, code] << shift  # uint8: the bits shifted past the byte drop out
        if spill:
            packed[:, byte + 1] |= groups[:, code] >> (scheme.bits - spill)
    return packed.reshape(-1)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The stored codes (``code + qmax + 1``, uint8) of ``packed``, the padding included."""
    bytes_ = packed.reshape(-1, bits)
    groups = torch.empty((bytes_.shape[0], 8), dtype=torch.uint8)
    for code, byte, shift, spill in _fields(bits):
        field = bytes_[:, byte] >> shift
        if spill:
            field |= bytes_[:, byte + 1] << (bits - spill)
        groups[:, code] = field & ((1 << bits) - 1)
    return groups.reshape(-1)


def _blocks(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """``values`` flattened, zero-padded to whole blocks, as (blocks, block_size)."""
    flat = values.reshape(-1)
    padding = -flat.numel() % block_size
    if padding:
        flat = torch.cat((flat, flat.new_zeros(padding)))
    return flat.view(-1, block_size)


def quantize(values: torch.Tensor, scheme: Scheme) -> Quantized:
    """``values`` (floating point, finite) compressed by ``scheme``, computed in float32 on the CPU.

    Raises
    ------
    ValueError
        If a value is not finite, or does not fit the scheme (beyond float16's range, a scale above
        :data:`MAX_SCALE`).
    """
    values = values.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("cannot compress non-finite values")
    if not scheme.blockwise:
        codes = values.to(torch.float16)
        if not bool(torch.isfinite(codes).all()):
            raise ValueError("values beyond float16's range cannot be sent as fp16")
        return Quantized(codes)
    blocks = _blocks(values, scheme.block_size)
    scales = blocks.abs().amax(dim=1) / scheme.qmax
    if bool((scales > MAX_SCALE).any()):
        raise ValueError(f"a block scale exceeds {MAX_SCALE:g}: the values are too large to compress")
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(blocks / safe[:, None]).clamp_(-scheme.qmax, scheme.qmax).reshape(-1)[: values.numel()]
    if scheme.packed:
        return Quantized(_pack(codes, scheme), scales)
    return Quantized(codes.to(torch.int8).reshape(values.shape), scales)


def _codes(quantized: Quantized, scheme: Scheme, numel: int) -> torch.Tensor:
    """The integer codes as a flat float32 tensor of ``numel`` values."""
    if not scheme.packed:
        return quantized.codes.reshape(-1).to(torch.float32)
    return _unpack(quantized.codes, scheme.bits)[:numel].to(torch.float32) - (scheme.qmax + 1)


def dequantize(quantized: Quantized, scheme: Scheme, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The float32 values ``quantized`` stands for, in ``shape`` (the inverse of :func:`quantize` up to its error)."""
    if not scheme.blockwise:
        return quantized.codes.to(torch.float32).reshape(shape)
    numel = math.prod(shape)
    codes = _codes(quantized, scheme, numel)
    blocks = _blocks(codes, scheme.block_size)
    return (blocks * quantized.scales[:, None]).reshape(-1)[:numel].reshape(shape)


def quantize_with_feedback(
    update: torch.Tensor, residual: torch.Tensor | None, scheme: Scheme
) -> tuple[Quantized, torch.Tensor]:
    """``update + residual`` compressed, and the new residual: what the compression left out (float32, CPU).

    Raises
    ------
    ValueError
        As :func:`quantize`.
    """
    intended = update.detach().to("cpu", torch.float32)
    if residual is not None:
        intended = intended + residual
    quantized = quantize(intended, scheme)
    return quantized, intended - dequantize(quantized, scheme, intended.shape)


def quantized_problem(quantized: Quantized, scheme: Scheme, shape: tuple[int, ...]) -> str | None:
    """Why ``quantized`` is not a well-formed compression of a tensor of ``shape`` by ``scheme``, or None.

    Checked: the codes' dtype and shape (packed: :func:`packed_length` bytes), every code in ``[-qmax, qmax]``
    and the padding codes 0, float16 values finite; the scales float32, one per block, finite, ``>= 0`` and at
    most :data:`MAX_SCALE`.
    """
    codes, scales, numel = quantized.codes, quantized.scales, math.prod(shape)
    if not scheme.blockwise:
        if codes.dtype != torch.float16 or tuple(codes.shape) != tuple(shape):
            return f"expected float16 values of shape {tuple(shape)}, got {codes.dtype} {tuple(codes.shape)}"
        return None if bool(torch.isfinite(codes).all()) else "holds NaN or Inf values"
    if not scheme.packed:
        if codes.dtype != torch.int8 or tuple(codes.shape) != tuple(shape):
            return f"expected int8 codes of shape {tuple(shape)}, got {codes.dtype} {tuple(codes.shape)}"
        if numel and int(codes.min()) < -scheme.qmax:
            return f"holds code {int(codes.min())}, outside [-{scheme.qmax}, {scheme.qmax}]"
    else:
        length = packed_length(numel, scheme.bits)
        if codes.dtype != torch.uint8 or tuple(codes.shape) != (length,):
            found = f"{codes.dtype} {tuple(codes.shape)}"
            return f"expected {length} uint8 bytes of {scheme.bits}-bit codes, got {found}"
        stored = _unpack(codes, scheme.bits)
        if bool((stored[:numel] == 0).any()):
            return f"holds the {scheme.bits}-bit code {-scheme.qmax - 1}, outside [-{scheme.qmax}, {scheme.qmax}]"
        if bool((stored[numel:] != scheme.qmax + 1).any()):
            return "the padding codes after the last value are not the zero code"
    blocks = scheme.blocks(numel)
    if scales is None or scales.dtype != torch.float32 or tuple(scales.shape) != (blocks,):
        found = "none" if scales is None else f"{scales.dtype} {tuple(scales.shape)}"
        return f"expected {blocks} float32 block scales ({numel} values in blocks of {scheme.block_size}), got {found}"
    if blocks and not bool(torch.isfinite(scales).all()):
        return "a block scale is NaN or Inf"
    if blocks and (float(scales.min()) < 0 or float(scales.max()) > MAX_SCALE):
        return f"block scales must be in [0, {MAX_SCALE:g}], got [{float(scales.min()):g}, {float(scales.max()):g}]"
    return None
