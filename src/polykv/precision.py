"""KV precision: the bit widths a layer's cache may be stored at, and the exact bytes it then holds.

This is the one statement of the byte cost of a layer, used by the plan's cost model (`polykv.plan.CostModel`) and
so by the solver. It follows the layout of the quantised storage (`polykv.quantize`, KIVI-style, group size
`GROUP`):
- 16 bits: keys and values in the model's dtype, `ELEMENT_BYTES` per element;
- 8, 4, 2 bits: packed codes, bits / 8 bytes per element (each batch row packed on its own, so a layer's codes take
  ceil(elements x bits / 8) bytes), plus one scale and one zero point per group, each in the model's dtype. Keys are
  quantised per channel, a group being `GROUP` consecutive tokens of one channel, so a layer of n tokens holds
  ceil(n / GROUP) key groups per channel (the last one partial); values per token, a group being `GROUP`
  consecutive channels of one token, ceil(D_v / GROUP) groups per token.
The model's dtype is taken to be 16-bit (bf16 / fp16), as everywhere in the plan's cost model. Decoded tokens that
the storage keeps in full precision until a group fills are not part of a plan's budget (it bounds the cache right
after the prefill).
"""

from __future__ import annotations

SUPPORTED_BITS = (16, 8, 4, 2)
FULL_PRECISION = 16
GROUP = 32
#: bytes of one element of the model's dtype (bf16 / fp16): the unquantised cache, scales and zero points
ELEMENT_BYTES = 2


def supported(bits: object) -> bool:
    """Whether `bits` is a width a plan may give a layer (an int in SUPPORTED_BITS, not a bool)."""
    return isinstance(bits, int) and not isinstance(bits, bool) and bits in SUPPORTED_BITS


def describe_supported() -> str:
    """`16, 8, 4 or 2`, for error messages."""
    return ", ".join(map(str, SUPPORTED_BITS[:-1])) + f" or {SUPPORTED_BITS[-1]}"


def unsupported_message(bits: object) -> str:
    """The one-line message for a width that is not in SUPPORTED_BITS."""
    return f"KV precision must be {describe_supported()} bits (16 = the model's dtype), got {bits!r}"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def kv_bytes(tokens: int, num_kv_heads: int, head_dim: int, bits: int, value_dim: int | None = None) -> int:
    """Exact bytes of one sequence's keys and values on one layer: `tokens` per KV head at `bits` (module doc).

    `value_dim` is the value head dimension when it differs from the key's `head_dim`.
    """
    if not supported(bits):
        raise ValueError(unsupported_message(bits))
    d_k, d_v = head_dim, head_dim if value_dim is None else value_dim
    if bits == FULL_PRECISION:
        return ELEMENT_BYTES * num_kv_heads * tokens * (d_k + d_v)
    codes = _ceil_div(num_kv_heads * tokens * d_k * bits, 8) + _ceil_div(num_kv_heads * tokens * d_v * bits, 8)
    key_groups = num_kv_heads * d_k * _ceil_div(tokens, GROUP)
    value_groups = num_kv_heads * tokens * _ceil_div(d_v, GROUP)
    return codes + 2 * ELEMENT_BYTES * (key_groups + value_groups)  # a scale and a zero point per group
