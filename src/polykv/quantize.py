"""Group-wise asymmetric integer quantization of K/V tensors (B, Hkv, T, D), packed so that the bytes are real.

Each group of `group` consecutive elements along one axis gets its own zero point (the group's minimum) and scale
((max - min) / (2^bits - 1)); an element is stored as round((x - zero) / scale) in `bits` bits. Keys are quantized
per channel (groups of consecutive tokens of one channel, `KEY_AXIS`) and values per token (groups of consecutive
channels of one token, `VALUE_AXIS`), as in KIVI (Liu et al., 2024), since keys have outlier channels and values
do not. The scale is rounded up to the input's dtype, so every element is within scale / 2 of its code (plus the
rounding of the dequantized value to that dtype). `bits=16` means no quantization: the tensor passes through.

Bytes, measured from the tensors' storage (`Quantized.nbytes`): the codes of each batch row are packed on their own
(8 bits: one per byte, 4: two, 2: four), ceil(elements per row x bits / 8) bytes per row, padding groups are never
stored; plus one scale and one zero point per group at the input's dtype, where an axis of length L holds
ceil(L / group) groups (the last one partial when `group` does not divide L).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from polykv.errors import InputError
from polykv.precision import FULL_PRECISION, GROUP, supported, unsupported_message

#: groups run along tokens (per-channel quantization, keys) or along channels (per-token, values)
KEY_AXIS, VALUE_AXIS = 2, 3


def check_bits(bits: object) -> int:
    """`bits` if it is a supported width (`polykv.precision.SUPPORTED_BITS`), else an `InputError` naming them."""
    if not supported(bits):
        raise InputError(unsupported_message(bits))
    return int(bits)


@dataclass(frozen=True, eq=False)
class Quantized:
    """A quantized tensor of `shape` and `dtype`.

    `data` (B, bytes per row) uint8 holds the packed codes of each batch row in the order of the tensor with `axis`
    moved last; `scales` and `zeros` (that layout with its last dim cut into groups: (..., ceil(L / group))) are in
    `dtype`. Every tensor owns exactly its storage and is batch-first, so rows can be selected (`select_rows`).
    """

    data: Tensor
    scales: Tensor
    zeros: Tensor
    bits: int
    group: int
    axis: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: the storages of the packed codes, the scales and the zero points."""
        return sum(t.untyped_storage().nbytes() for t in (self.data, self.scales, self.zeros))


def nbytes(x: Quantized | Tensor) -> int:
    """Bytes of storage a (possibly quantized) tensor holds."""
    return x.nbytes if isinstance(x, Quantized) else x.untyped_storage().nbytes()


def quantize(x: Tensor, bits: int, axis: int, group: int = GROUP) -> Quantized | Tensor:
    """`x` (B, Hkv, T, D) quantized to `bits` in groups of `group` along `axis` (2: tokens, 3: channels); bits=16
    returns `x` itself. `group` is clamped to the axis length; a last partial group is padded internally by
    repeating its last element, which leaves its minimum and maximum unchanged."""
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        return x
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise InputError(f"quantization group must be a positive number of elements, got {group!r}")
    if x.dim() != 4 or axis not in (2, 3, -1, -2):
        raise ValueError(f"quantize takes (B, Hkv, T, D) along axis 2 or 3, got shape {tuple(x.shape)} axis {axis}")
    axis %= 4
    moved = x.movedim(axis, -1)
    length = moved.shape[-1]
    group = max(1, min(group, length))
    pad = -length % group
    if pad:
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
    work = _work_dtype(x.dtype)
    grouped = moved.to(work).unflatten(-1, (-1, group))
    low, high = grouped.amin(-1), grouped.amax(-1)
    levels = 2**bits - 1
    zeros = low.to(x.dtype)  # exact: the minimum is one of x's elements
    scales = _round_up((high - low) / levels, x.dtype)
    step = torch.where(scales > 0, scales, torch.ones_like(scales)).to(work)
    codes = torch.round((grouped - zeros.to(work)[..., None]) / step[..., None]).clamp_(0, levels)
    codes = codes.to(torch.uint8).flatten(-2)[..., :length].reshape(x.shape[0], -1)
    return Quantized(_pack(codes, bits), scales, zeros, bits, group, axis, tuple(x.shape), x.dtype)


def dequantize(q: Quantized | Tensor) -> Tensor:
    """The tensor `q` stands for, in its original shape and dtype (contiguous); a plain tensor is returned as is."""
    if isinstance(q, Tensor):
        return q
    moved_shape = [*q.shape[: q.axis], *q.shape[q.axis + 1 :], q.shape[q.axis]]
    length = moved_shape[-1]
    work = _work_dtype(q.dtype)
    codes = _unpack(q.data, q.bits, math.prod(moved_shape[1:])).view(moved_shape).to(work)
    scales = q.scales.to(work).repeat_interleave(q.group, -1)[..., :length]
    zeros = q.zeros.to(work).repeat_interleave(q.group, -1)[..., :length]
    return (codes * scales + zeros).to(q.dtype).movedim(-1, q.axis).contiguous()


def round_trip(x: Tensor, bits: int, axis: int, group: int = GROUP) -> Tensor:
    """`x` as attention reads it once stored at `bits`: quantized as `quantize` does, then dequantized (`x` itself
    at 16 bits). Calibration measures a layer at a precision by reading its kept keys and values this way."""
    return dequantize(quantize(x, bits, axis, group))


def select_rows(q: Quantized | Tensor, index: Tensor) -> Quantized | Tensor:
    """Batch rows `index` of `q` (reordering or dropping rows, as `Tensor.index_select(0, index)`)."""
    if isinstance(q, Tensor):
        return q.index_select(0, index.to(q.device))
    index = index.to(q.data.device)
    picked = {name: getattr(q, name).index_select(0, index) for name in ("data", "scales", "zeros")}
    return replace(q, **picked, shape=(len(index), *q.shape[1:]))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _round_up(x: Tensor, dtype: torch.dtype) -> Tensor:
    """`x` in `dtype`, rounded up (not to nearest) so that a scale never shrinks below the group's range."""
    out = x.to(dtype)
    low = out.to(x.dtype) < x
    return torch.where(low, torch.nextafter(out, torch.full_like(out, float("inf"))), out)


def _pack(codes: Tensor, bits: int) -> Tensor:
    """(B, n) codes < 2^bits -> (B, ceil(n x bits / 8)) bytes, value i of a byte in bits [i*bits, (i+1)*bits)."""
    if bits == 8:
        return codes.contiguous()
    per = 8 // bits
    codes = torch.nn.functional.pad(codes, (0, -codes.shape[1] % per))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (codes.view(codes.shape[0], -1, per) << shifts).sum(-1, dtype=torch.uint8)


def _unpack(data: Tensor, bits: int, n: int) -> Tensor:
    """The first `n` codes of each row of `_pack`'s bytes, (B, n) uint8."""
    if bits == 8:
        return data[:, :n]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=data.device)
    return ((data.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(1)[:, :n]
