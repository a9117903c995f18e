"""Torch references of the PolyKV kernels; also the production path on CPU (and wherever Triton is not used).

Each function defines the exact semantics the Triton kernels are tested against. They compute in fp32 and bound
their temporaries: `window_scores` works on chunks of KV heads and window rows (softmax is per query row, so
chunking rows is exact) and never holds B x Hq x W x T logits at once for long prompts; `decode_attention` reads
K and V per KV head group without repeating them for the GQA group.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Largest number of fp32 logits `window_scores` materialises per step (64 MiB); tests lower it to force chunking.
MAX_LOGITS = 1 << 24


def check_gqa(q_heads: int, kv_heads: int) -> int:
    """The GQA group size G = Hq / Hkv; query head h reads KV head h // G (transformers' repeat_kv layout)."""
    if kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} KV heads")
    return q_heads // kv_heads


def softcapped(logits: Tensor, softcap: float | None) -> Tensor:
    """Gemma-2 style logit soft-capping: softcap * tanh(logits / softcap); identity when softcap is None or 0."""
    return logits if not softcap else softcap * torch.tanh(logits / softcap)


def window_scores(
    q: Tensor, k: Tensor, scaling: float, valid: Tensor | None = None, softcap: float | None = None
) -> Tensor:
    """(B, Hkv, T) fp32: causal softmax attention of the W window queries, summed over them and the GQA group.

    q (B, Hq, W, D) are the last W prompt queries, k (B, Hkv, T, D) all keys; window query i sits at position
    T - W + i and sees keys j <= T - W + i; keys where `valid` (B, T) is False are excluded. A query row that sees
    no key at all (a padding row) contributes nothing. This is the per-token statistic SnapKV/TOVA-style policies
    rank tokens by; pooling is left to the caller.
    """
    batch, q_heads, window, dim = q.shape
    kv_heads, tokens = k.shape[1], k.shape[2]
    groups = check_gqa(q_heads, kv_heads)
    if not 1 <= window <= tokens:
        raise ValueError(f"window of {window} queries does not fit {tokens} keys")
    rows = groups * window
    # rows of one KV head: query head (h * G + g), window index i -> row g * W + i
    q_rows = q.reshape(batch, kv_heads, rows, dim)
    positions = (tokens - window) + torch.arange(rows, device=k.device) % window
    cols = torch.arange(tokens, device=k.device)
    key_ok = None if valid is None else valid.to(device=k.device, dtype=torch.bool)[:, None, None, :]
    out = torch.empty(batch, kv_heads, tokens, dtype=torch.float32, device=k.device)
    per_head = batch * rows * tokens
    head_chunk = max(1, min(kv_heads, MAX_LOGITS // max(per_head, 1)))
    row_chunk = rows if head_chunk > 1 or per_head <= MAX_LOGITS else max(1, MAX_LOGITS // (batch * tokens))
    for h0 in range(0, kv_heads, head_chunk):
        h1 = min(h0 + head_chunk, kv_heads)
        keys_t = k[:, h0:h1].float().transpose(-1, -2)
        total = torch.zeros(batch, h1 - h0, tokens, dtype=torch.float32, device=k.device)
        for r0 in range(0, rows, row_chunk):
            r1 = min(r0 + row_chunk, rows)
            logits = softcapped(torch.matmul(q_rows[:, h0:h1, r0:r1].float(), keys_t) * scaling, softcap)
            allowed = (cols[None, :] <= positions[r0:r1, None])[None, None]
            if key_ok is not None:
                allowed = allowed & key_ok
            probs = torch.softmax(logits.masked_fill_(~allowed, float("-inf")), dim=-1)
            total += torch.nan_to_num_(probs, nan=0.0).sum(dim=2)
        out[:, h0:h1] = total
    return out


def gather_kv(k: Tensor, v: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Compact K and V to the kept tokens: out[b, h, j] = k[b, h, idx[b, h, j]] (idx (B, Hkv, K), any order)."""
    idx = idx.to(device=k.device, dtype=torch.int64)
    k_out = torch.gather(k, 2, idx[..., None].expand(-1, -1, -1, k.shape[-1]))
    v_out = torch.gather(v, 2, idx[..., None].expand(-1, -1, -1, v.shape[-1]))
    return k_out, v_out


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scaling: float, softcap: float | None = None
) -> Tensor:
    """(B, Hq, Dv) in q's dtype: one query per sequence attending the first lengths[b, h] keys of its KV head.

    q (B, Hq, D); k (B, Hkv, Tmax, D) and v (B, Hkv, Tmax, Dv) are padded storage; lengths (B, Hkv) >= 1 per
    KV head, so per-head budgets work. Softmax and the weighted sum of values are done in fp32.
    """
    batch, q_heads, dim = q.shape
    kv_heads, tmax = k.shape[1], k.shape[2]
    groups = check_gqa(q_heads, kv_heads)
    queries = q.float().reshape(batch, kv_heads, groups, dim)
    logits = softcapped(torch.matmul(queries, k.float().transpose(-1, -2)) * scaling, softcap)
    lengths = lengths.to(device=k.device, dtype=torch.int64)
    outside = torch.arange(tmax, device=k.device)[None, None, None, :] >= lengths[:, :, None, None]
    probs = torch.softmax(logits.masked_fill_(outside, float("-inf")), dim=-1)
    out = torch.matmul(probs, v.float())
    return out.reshape(batch, q_heads, v.shape[-1]).to(q.dtype)


def masked_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scaling: float, softcap: float | None = None
) -> Tensor:
    """(B, Hq, Dv): one query per sequence over the keys `visible` (B, Hkv or 1, Tmax) marks, without GQA copies.

    The ragged-batch decode path (padded or per-head caches): each KV head's G query heads are attended as G rows
    against that head's keys, so K and V are never repeated G times (what a plain sdpa call with a mask does on
    CPU, and most of a batched decode step's time there).
    """
    batch, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    groups = check_gqa(q_heads, kv_heads)
    queries = q.reshape(batch, kv_heads, groups, dim)
    mask = visible[:, :, None, :]
    if softcap is None:
        out = torch.nn.functional.scaled_dot_product_attention(queries, k, v, attn_mask=mask, scale=scaling)
    else:
        logits = softcapped(torch.matmul(queries.float(), k.float().transpose(-1, -2)) * scaling, softcap)
        probs = torch.softmax(logits.masked_fill_(~mask, float("-inf")), dim=-1)
        out = torch.matmul(probs, v.float())
    return out.reshape(batch, q_heads, v.shape[-1]).to(q.dtype)
