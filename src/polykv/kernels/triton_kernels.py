"""Triton kernels for PolyKV (window scoring, KV compaction, decode attention) and their Python launchers.

Written for CUDA GPUs (Ampere/Hopper) and tested on CPU with the Triton interpreter (TRITON_INTERPRET=1 must be
set before this module is imported: `triton.jit` picks interpreter or compiler at decoration time). The only module
of PolyKV that imports triton. Semantics are those of `polykv.kernels.reference`.

Numerics: products of Q and K run on the input dtype with fp32 accumulation (fp16/bf16 products are exact in fp32);
softmax statistics and all sums are fp32; fp32 inputs use IEEE fp32 dots (never TF32). Programs index tensors
through their strides, so sliced (non-contiguous) inputs need no copy.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from polykv.kernels.reference import check_gqa

#: Whether the kernels below were built for the CPU interpreter (decided when this module was imported).
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG2E: tl.constexpr = tl.constexpr(math.log2(math.e))
#: Finite "minus infinity" for running maxima: keeps exp2(m_old - m_new) at 1, not NaN, while a row has seen no key.
NEG_BIG: tl.constexpr = tl.constexpr(-1.0e30)


def _pow2(n: int, low: int = 16) -> int:
    """Smallest power of two >= n and >= low (tl.arange needs powers of two, tl.dot at least 16)."""
    return max(low, triton.next_power_of_2(max(n, 1)))


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots for fp32 inputs (TF32 would miss the 1e-4 tolerance); 16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _scaled_logits(s, scaling, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k -> logits in log2 units: s * scaling, optionally soft-capped as softcap * tanh(x / softcap)."""
    s = s * scaling
    if HAS_SOFTCAP:
        z = s / softcap
        e = tl.exp2(-2.0 * LOG2E * tl.abs(z))  # tanh(|z|) = (1 - e) / (1 + e), overflow-free
        th = (1.0 - e) / (1.0 + e)
        s = softcap * tl.where(z < 0, -th, th)
    return s * LOG2E


# --------------------------------------------------------------------------------------------------------------
# 1. window scores: two passes, (a) row max / row sum per window query, (b) normalised probabilities summed per key
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _window_stats_kernel(
    q_ptr, k_ptr, valid_ptr, m_ptr, l_ptr,
    sqb, sqh, sqw, sqd, skb, skh, skt, skd, svb, svt,
    T, W, R, HKV, G, scaling, softcap,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Per window row (G query heads x W queries of one KV head): online max and sum of exp over causal keys."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // HKV).to(tl.int64)
    h = (pid_bh % HKV).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    qi = rows % W
    pos = T - W + qi
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_off = b * sqb + (h * G + rows // W)[:, None] * sqh + qi[:, None] * sqw + d[None, :] * sqd
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_R], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    k_base = k_ptr + b * skb + h * skh
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        col_ok = cols < T
        kb = tl.load(k_base + cols[:, None] * skt + d[None, :] * skd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = _scaled_logits(tl.dot(q, tl.trans(kb), input_precision=DOT_PREC), scaling, softcap, HAS_SOFTCAP)
        allowed = cols[None, :] <= pos[:, None]
        if HAS_VALID:
            key_ok = tl.load(valid_ptr + b * svb + cols * svt, mask=col_ok, other=0) != 0
            allowed = allowed & key_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    out = pid_bh.to(tl.int64) * R + rows
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(l_ptr + out, l_i, mask=row_ok)


@triton.jit
def _window_scores_kernel(
    q_ptr, k_ptr, valid_ptr, m_ptr, l_ptr, out_ptr,
    sqb, sqh, sqw, sqd, skb, skh, skt, skd, svb, svt,
    T, W, R, HKV, G, scaling, softcap,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One block of keys of one KV head: sum over all window rows of exp(s - m) / l, using pass-1 statistics."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // HKV).to(tl.int64)
    h = (pid_bh % HKV).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    col_ok = cols < T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    kb = tl.load(
        k_ptr + b * skb + h * skh + cols[:, None] * skt + d[None, :] * skd,
        mask=col_ok[:, None] & d_ok[None, :], other=0.0,
    )
    key_ok = col_ok
    if HAS_VALID:
        key_ok = key_ok & (tl.load(valid_ptr + b * svb + cols * svt, mask=col_ok, other=0) != 0)
    acc = tl.zeros([BLOCK_T], tl.float32)
    stats = pid_bh.to(tl.int64) * R
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        qi = rows % W
        q_off = b * sqb + (h * G + rows // W)[:, None] * sqh + qi[:, None] * sqw + d[None, :] * sqd
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m = tl.load(m_ptr + stats + rows, mask=row_ok, other=0.0)
        l = tl.load(l_ptr + stats + rows, mask=row_ok, other=0.0)
        inv_l = tl.where(l > 0, 1.0 / l, 0.0)  # rows that saw no key (padding) contribute nothing
        s = _scaled_logits(tl.dot(q, tl.trans(kb), input_precision=DOT_PREC), scaling, softcap, HAS_SOFTCAP)
        allowed = (cols[None, :] <= (T - W + qi)[:, None]) & key_ok[None, :] & row_ok[:, None]
        p = tl.where(allowed, tl.exp2(s - m[:, None]), 0.0) * inv_l[:, None]
        acc += tl.sum(p, 0)
    tl.store(out_ptr + pid_bh.to(tl.int64) * T + cols, acc, mask=col_ok)


def window_scores(
    q: Tensor,
    k: Tensor,
    scaling: float,
    valid: Tensor | None = None,
    softcap: float | None = None,
    *,
    block_r: int | None = None,
    block_t: int | None = None,
) -> Tensor:
    """(B, Hkv, T) fp32 window scores (see `reference.window_scores`); streams over T, two launches.

    Memory beyond the output is two fp32 statistics per window row (B x Hq x W); no W x T tile outlives a block.
    """
    batch, q_heads, window, dim = q.shape
    kv_heads, tokens = k.shape[1], k.shape[2]
    groups = check_gqa(q_heads, kv_heads)
    softcap = softcap or None
    if not 1 <= window <= tokens:
        raise ValueError(f"window of {window} queries does not fit {tokens} keys")
    if q.dtype != k.dtype:
        raise TypeError(f"queries ({q.dtype}) and keys ({k.dtype}) must share a dtype")
    rows = groups * window
    block_d = _pow2(dim)
    block_r = block_r or min(_pow2(rows), 128 if INTERPRETED else 64)
    block_t = block_t or (min(_pow2(tokens), 256) if INTERPRETED else (64 if block_d > 128 or block_r > 32 else 128))
    stats_m = torch.empty(batch, kv_heads, rows, dtype=torch.float32, device=k.device)
    stats_l = torch.empty_like(stats_m)
    out = torch.empty(batch, kv_heads, tokens, dtype=torch.float32, device=k.device)
    if valid is not None:
        valid_t = valid.to(device=k.device, dtype=torch.int8)
        svb, svt = valid_t.stride()
    else:
        valid_t, svb, svt = out, 0, 0
    common = (
        *q.stride(), *k.stride(), svb, svt, tokens, window, rows, kv_heads, groups, float(scaling),
        float(softcap or 1.0),
    )
    meta = dict(
        D=dim, BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_D=block_d, HAS_VALID=valid is not None,
        HAS_SOFTCAP=softcap is not None, DOT_PREC=_dot_precision(q.dtype),
    )
    _window_stats_kernel[(batch * kv_heads, triton.cdiv(rows, block_r))](q, k, valid_t, stats_m, stats_l, *common, **meta)
    _window_scores_kernel[(batch * kv_heads, triton.cdiv(tokens, block_t))](
        q, k, valid_t, stats_m, stats_l, out, *common, **meta
    )
    return out


# --------------------------------------------------------------------------------------------------------------
# 2. gather: compact K and V to kept token indices in one launch
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _gather_kv_kernel(
    k_ptr, v_ptr, idx_ptr, ko_ptr, vo_ptr,
    skb, skh, skt, skd, svb, svh, svt, svd, sib, sih, sij,
    K, HKV,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One block of kept slots of one (batch, KV head): copy the indexed K and V rows into contiguous outputs."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // HKV).to(tl.int64)
    h = (pid_bh % HKV).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_ok = j < K
    t = tl.load(idx_ptr + b * sib + h * sih + j * sij, mask=j_ok, other=0).to(tl.int64)
    row = pid_bh.to(tl.int64) * K + j
    dk = tl.arange(0, BLOCK_DK)
    mk = j_ok[:, None] & (dk < DK)[None, :]
    kv = tl.load(k_ptr + b * skb + h * skh + t[:, None] * skt + dk[None, :] * skd, mask=mk)
    tl.store(ko_ptr + row[:, None] * DK + dk[None, :], kv, mask=mk)
    dv = tl.arange(0, BLOCK_DV)
    mv = j_ok[:, None] & (dv < DV)[None, :]
    vv = tl.load(v_ptr + b * svb + h * svh + t[:, None] * svt + dv[None, :] * svd, mask=mv)
    tl.store(vo_ptr + row[:, None] * DV + dv[None, :], vv, mask=mv)


def gather_kv(k: Tensor, v: Tensor, idx: Tensor, *, block_k: int | None = None) -> tuple[Tensor, Tensor]:
    """Contiguous (B, Hkv, K, D) copies of the rows `idx` (B, Hkv, K) of k and v; one launch moves both.

    Indices are not bounds-checked on the device (that would cost a sync): they must lie in [0, T).
    """
    batch, kv_heads, _, dim_k = k.shape
    dim_v = v.shape[-1]
    kept = idx.shape[-1]
    k_out = torch.empty(batch, kv_heads, kept, dim_k, dtype=k.dtype, device=k.device)
    v_out = torch.empty(batch, kv_heads, kept, dim_v, dtype=v.dtype, device=v.device)
    if kept == 0 or batch * kv_heads == 0:
        return k_out, v_out
    idx = idx.to(k.device)
    block_k = block_k or min(_pow2(kept, 1), 256 if INTERPRETED else 32)
    _gather_kv_kernel[(batch * kv_heads, triton.cdiv(kept, block_k))](
        k, v, idx, k_out, v_out, *k.stride(), *v.stride(), *idx.stride(), kept, kv_heads,
        DK=dim_k, DV=dim_v, BLOCK_K=block_k, BLOCK_DK=_pow2(dim_k, 1), BLOCK_DV=_pow2(dim_v, 1),
    )
    return k_out, v_out


# --------------------------------------------------------------------------------------------------------------
# 3. decode attention: flash-decoding, split the keys of each (batch, KV head) over programs, then combine
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, mo_ptr, mm_ptr, ml_ptr,
    sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd, slb, slh,
    TMAX, HKV, G, CHUNK, S, scaling, softcap,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, QK_PREC: tl.constexpr, PV_PREC: tl.constexpr,
):
    """Keys [split * CHUNK, min(next split, length)) of one KV head against its G queries: unnormalised output,
    running max and sum per query head, written to the split's slot (an empty split writes max=-1e30, sum=0)."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = (pid_bh % HKV).to(tl.int64)
    length = tl.minimum(tl.load(len_ptr + b * slb + h * slh).to(tl.int32), TMAX)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, length)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < DV
    q = tl.load(q_ptr + b * sqb + (h * G + g)[:, None] * sqh + d[None, :] * sqd, mask=g_ok[:, None] & d_ok[None, :],
                other=0.0)
    m_i = tl.full([BLOCK_G], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        kb = tl.load(k_base + cols[:, None] * skt + d[None, :] * skd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = _scaled_logits(tl.dot(q, tl.trans(kb), input_precision=QK_PREC), scaling, softcap, HAS_SOFTCAP)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = tl.load(v_base + cols[:, None] * svt + dv[None, :] * svd, mask=col_ok[:, None] & dv_ok[None, :],
                     other=0.0).to(tl.float32)  # 16-bit values are exact in fp32 (and in TF32)
        acc = acc * alpha[:, None] + tl.dot(p, vb, input_precision=PV_PREC)
        m_i = m_new
    slot = ((b * HKV + h) * G + g) * S + split  # partials laid out (B, Hq, S[, DV])
    tl.store(mm_ptr + slot, m_i, mask=g_ok)
    tl.store(ml_ptr + slot, l_i, mask=g_ok)
    tl.store(mo_ptr + slot[:, None] * DV + dv[None, :], acc, mask=g_ok[:, None] & dv_ok[None, :])


@triton.jit
def _decode_reduce_kernel(
    mo_ptr, mm_ptr, ml_ptr, out_ptr, sob, soh, sod, HQ, S,
    DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Combine the S partial (max, sum, output) triples of one query head into the normalised attention output."""
    pid = tl.program_id(0)
    b = (pid // HQ).to(tl.int64)
    qh = (pid % HQ).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < S
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < DV
    slot = pid.to(tl.int64) * S + s
    m = tl.load(mm_ptr + slot, mask=s_ok, other=float("-inf"))
    l = tl.load(ml_ptr + slot, mask=s_ok, other=0.0)
    o = tl.load(mo_ptr + slot[:, None] * DV + dv[None, :], mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # empty splits (max -1e30) get weight 0
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w * l, 0)
    tl.store(out_ptr + b * sob + qh * soh + dv * sod, out.to(out_ptr.dtype.element_ty), mask=dv_ok)


def _num_splits(tmax: int, programs: int, block_n: int, device: torch.device) -> int:
    """Splits per (batch, KV head): enough programs to fill the GPU twice over, each split >= 2 key blocks."""
    most = max(1, min(64, triton.cdiv(tmax, 2 * block_n)))
    if device.type != "cuda":
        return min(most, 4)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(most, triton.cdiv(2 * sms, programs)))


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lengths: Tensor,
    scaling: float,
    softcap: float | None = None,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """(B, Hq, Dv) in q's dtype: single-query attention over per-(batch, KV head) variable-length padded KV.

    Flash-decoding: grid (B * Hkv, splits), each program reads its chunk of keys once for all G query heads of
    the KV head; a second launch merges the fp32 partials. lengths (B, Hkv) must be >= 1 (0 gives NaN, as softmax
    over nothing does in the reference); lengths above Tmax are clamped.
    """
    batch, q_heads, dim = q.shape
    kv_heads, tmax, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    groups = check_gqa(q_heads, kv_heads)
    softcap = softcap or None
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    lengths = lengths.to(k.device)
    if lengths.shape != (batch, kv_heads):
        raise ValueError(f"lengths must be (B, Hkv) = {(batch, kv_heads)}, got {tuple(lengths.shape)}")
    block_d, block_dv = _pow2(dim), _pow2(dim_v)
    block_n = block_n or (min(_pow2(tmax), 128) if INTERPRETED else (64 if max(block_d, block_dv) <= 128 else 32))
    splits = num_splits or _num_splits(tmax, batch * kv_heads, block_n, k.device)
    chunk = triton.cdiv(triton.cdiv(tmax, splits), block_n) * block_n
    splits = triton.cdiv(tmax, chunk)  # no split may start past Tmax
    part_m = torch.empty(batch, q_heads, splits, dtype=torch.float32, device=k.device)
    part_l = torch.empty_like(part_m)
    part_o = torch.empty(batch, q_heads, splits, dim_v, dtype=torch.float32, device=k.device)
    out = torch.empty(batch, q_heads, dim_v, dtype=q.dtype, device=k.device)
    _decode_split_kernel[(batch * kv_heads, splits)](
        q, k, v, lengths, part_o, part_m, part_l,
        *q.stride(), *k.stride(), *v.stride(), *lengths.stride(),
        tmax, kv_heads, groups, chunk, splits, float(scaling), float(softcap or 1.0),
        D=dim, DV=dim_v, BLOCK_G=_pow2(groups), BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        HAS_SOFTCAP=softcap is not None, QK_PREC=_dot_precision(q.dtype), PV_PREC=_dot_precision(v.dtype),
    )
    _decode_reduce_kernel[(batch * q_heads,)](
        part_o, part_m, part_l, out, *out.stride(), q_heads, splits,
        DV=dim_v, BLOCK_S=_pow2(splits, 1), BLOCK_DV=_pow2(dim_v, 1),
    )
    return out
