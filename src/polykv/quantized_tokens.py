"""A layer's oldest keys and values stored quantized, in token order: what a `PolyKVLayer` with bits < 16 holds.

The store is a sequence of chunks, each the quantized keys (per channel) and values (per token) of consecutive
tokens (`polykv.quantize`): the tokens a layer kept when it was compressed, then each run of `group` decoded tokens
once it has filled (the layer keeps the newer ones in full precision until then: KIVI's residual). Chunks start at a
token that begins a key group, so no key group spans two chunks. Dropping the oldest tokens (a sliding layer)
skips them in the first chunk and frees a chunk once all its tokens are gone. The store is immutable: every change
returns a new one, so copies of a layer (`capture.clone_layer`) may share it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from polykv.quantize import KEY_AXIS, VALUE_AXIS, Quantized, dequantize, quantize, select_rows


@dataclass(frozen=True, eq=False)
class QuantizedTokens:
    """Chunks of quantized keys and values (each (B, Hkv, n_i, D) once dequantized), minus the first chunk's
    leading `skip` tokens."""

    bits: int
    group: int
    keys: tuple[Quantized, ...] = ()
    values: tuple[Quantized, ...] = ()
    skip: int = 0

    def append(self, keys: Tensor, values: Tensor) -> QuantizedTokens:
        """The store followed by `keys`/`values` (B, Hkv, n, D), quantized as one more chunk."""
        key = quantize(keys, self.bits, KEY_AXIS, self.group)
        value = quantize(values, self.bits, VALUE_AXIS, self.group)
        return replace(self, keys=(*self.keys, key), values=(*self.values, value))

    @property
    def tokens(self) -> int:
        return sum(k.shape[2] for k in self.keys) - self.skip

    @property
    def nbytes(self) -> int:
        """Bytes held by every chunk (a partly dropped first chunk counts whole: its storage is still held)."""
        return sum(q.nbytes for q in (*self.keys, *self.values))

    def followed_by(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Every stored token dequantized, followed by the full-precision `keys`/`values` (B, Hkv, n, D)."""
        out = []
        for chunks, recent in ((self.keys, keys), (self.values, values)):
            parts = [dequantize(q) for q in chunks]
            if parts and self.skip:
                parts[0] = parts[0][:, :, self.skip :]
            out.append(torch.cat([*parts, recent], dim=2) if parts else recent)
        return out[0], out[1]

    def drop_first(self, count: int) -> QuantizedTokens:
        """Without the oldest `count` tokens (at most `tokens`); whole chunks are freed as they empty."""
        keys, values, skip = list(self.keys), list(self.values), self.skip + count
        while keys and skip >= keys[0].shape[2]:
            skip -= keys.pop(0).shape[2]
            values.pop(0)
        return replace(self, keys=tuple(keys), values=tuple(values), skip=skip)

    def select_rows(self, index: Tensor) -> QuantizedTokens:
        """Batch rows `index` (beam search, or dropping finished rows)."""
        pick = [tuple(select_rows(q, index) for q in chunks) for chunks in (self.keys, self.values)]
        return replace(self, keys=pick[0], values=pick[1])
