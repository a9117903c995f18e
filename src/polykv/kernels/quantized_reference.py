"""Torch reference of decode attention over a quantized KV store; also the production path off CUDA.

It defines the exact semantics the Triton kernel (`polykv.kernels.triton_quantized`) is tested against: every
chunk of the store is dequantized with `polykv.quantize.dequantize` (the storage's own definition of what its codes
mean), the store's first `skip` tokens are dropped, and one query per (batch, query head) attends over the rest in
fp32, like sdpa with an additive mask. Query head h reads KV head h // G (GQA group G = Hq / Hkv).
"""

from __future__ import annotations

import torch
from torch import Tensor

from polykv.kernels.reference import check_gqa
from polykv.quantize import dequantize
from polykv.quantized_tokens import QuantizedTokens


def stored_tokens(store: QuantizedTokens) -> tuple[Tensor, Tensor]:
    """The store's keys and values (B, Hkv, N, D) dequantized, in token order, its `skip` first tokens dropped."""
    if not store.keys:
        raise ValueError("the quantized store holds no tokens")
    keys = torch.cat([dequantize(k) for k in store.keys], dim=2)[:, :, store.skip :]
    values = torch.cat([dequantize(v) for v in store.values], dim=2)[:, :, store.skip :]
    return keys, values


def additive_mask(mask: Tensor, q_heads: int, kv_heads: int, tokens: int, dtype: torch.dtype) -> Tensor:
    """`mask` (B or 1, 1 | Hkv | Hq, 1, N) as an additive float mask of that shape: a boolean one (True = visible)
    becomes 0 / -inf; a float one is returned as is. Raises on any other shape."""
    if mask.dim() != 4 or mask.shape[1] not in (1, kv_heads, q_heads) or mask.shape[2:] != (1, tokens):
        raise ValueError(f"mask must be (B or 1, 1 | {kv_heads} | {q_heads}, 1, {tokens}), got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask


def key_lengths(lengths: Tensor, batch: int, kv_heads: int) -> Tensor:
    """`lengths` (B,) or (B, Hkv) as a (B, Hkv) view (no copy): how many of the first tokens each KV head sees."""
    if lengths.dim() == 1 and lengths.shape[0] == batch:
        return lengths[:, None].expand(batch, kv_heads)
    if lengths.shape != (batch, kv_heads):
        raise ValueError(f"lengths must be ({batch},) or ({batch}, {kv_heads}), got {tuple(lengths.shape)}")
    return lengths


def quantized_decode_attention(
    q: Tensor, store: QuantizedTokens, scaling: float, mask: Tensor | None = None, lengths: Tensor | None = None
) -> Tensor:
    """(B, Hq, 1, Dv) in q's dtype: each query q (B, Hq, 1, D) attending over the N tokens of `store`.

    Logits are (q . k) * scaling + mask in fp32; `mask` (B or 1, 1 | Hkv | Hq, 1, N) is additive (float) or boolean
    (True = visible); with `lengths` (B,) or (B, Hkv) only the first lengths tokens of each KV head are seen.
    Softmax and the weighted sum of values are fp32. A query that sees no token gives NaN, as softmax over
    nothing does.
    """
    keys, values = stored_tokens(store)
    batch, q_heads, _, dim = q.shape
    kv_heads, tokens = keys.shape[1], keys.shape[2]
    groups = check_gqa(q_heads, kv_heads)
    queries = q.float().reshape(batch, kv_heads, groups, dim)
    logits = torch.matmul(queries, keys.float().transpose(-1, -2)) * scaling  # (B, Hkv, G, N)
    if mask is not None:
        added = additive_mask(mask, q_heads, kv_heads, tokens, q.dtype).float()
        if added.shape[1] == q_heads:
            added = added.reshape(added.shape[0], kv_heads, groups, tokens)
        logits = logits + added  # (B or 1, 1 | Hkv, 1, N) broadcasts over the group
    if lengths is not None:
        seen = key_lengths(lengths.to(keys.device), batch, kv_heads).to(torch.int64)
        outside = torch.arange(tokens, device=keys.device)[None, None, None, :] >= seen[:, :, None, None]
        logits = logits.masked_fill(outside, float("-inf"))
    out = torch.matmul(torch.softmax(logits, dim=-1), values.float())
    return out.reshape(batch, q_heads, 1, values.shape[-1]).to(q.dtype)
