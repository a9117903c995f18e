"""Triton kernels for PolyKV (window scoring, KV compaction, decode attention) and their Python launchers.

Written for CUDA GPUs (Ampere/Hopper) and tested on CPU with the Triton interpreter (TRITON_INTERPRET=1 must be
set before this module is imported: `triton.jit` picks interpreter or compiler at decoration time). With
`triton_quantized` (decode over quantized KV), the only modules of PolyKV that import triton. Semantics are those of
`polykv.kernels.reference`.

Numerics: products of Q and K run on the input dtype with fp32 accumulation (fp16/bf16 products are exact in fp32);
softmax statistics and all sums are fp32; fp32 inputs use IEEE fp32 dots (never TF32). Programs index tensors
through their strides, so sliced (non-contiguous) inputs need no copy.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from polykv.kernels.reference import check_gqa

#: Whether the kernels below were built for the CPU interpreter (decided when this module was imported).
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Tests set this to fill scratch buffers with NaN, so a partial result a kernel forgot to write shows up.
POISON_SCRATCH: bool = False

# Kernels spell two constants as literals (jit functions may not read module globals): log2(e) = 1.4426950408889634
# (softmax runs in base 2) and -1.0e30, a finite "minus infinity" for running maxima that keeps exp2(m_old - m_new)
# at 1, not NaN, while a row has seen no key yet.


def _pow2(n: int, low: int = 16) -> int:
    """Smallest power of two >= n and >= low (tl.arange needs powers of two, tl.dot at least 16)."""
    return max(low, triton.next_power_of_2(max(n, 1)))


def _scratch(*shape: int, device: torch.device) -> Tensor:
    """An fp32 intermediate buffer: uninitialised, or NaN-filled when POISON_SCRATCH is on."""
    if POISON_SCRATCH:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _check_out(out: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The caller's output buffer after checking it fits (any strides), or a new one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(f"out must be {shape} {dtype} on {device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots for fp32 inputs (TF32 would miss the 1e-4 tolerance); 16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def window_blocks(rows: int, dim: int, itemsize: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_T) for window scoring, sized so that with 8 warps neither kernel spills registers and
    shared memory stays under the 99 KiB of consumer Ampere/Ada GPUs (checked by compiling for sm_80 and sm_90)."""
    if INTERPRETED:  # few, large programs: the interpreter's cost is per program and per loop step
        return min(_pow2(rows), 128), 256
    row_bytes = _pow2(dim) * itemsize
    key_tile = 16384 if itemsize >= 4 else 32768
    return max(16, min(_pow2(rows), 64, 16384 // row_bytes)), max(16, min(128, key_tile // row_bytes))


def decode_block_n(dim: int, dim_v: int, itemsize: int) -> int:
    """Keys per step of decode attention: K and V tiles of at most 16 KiB each (V is widened to fp32 in registers,
    so larger tiles spill)."""
    if INTERPRETED:
        return 128
    return max(16, min(64, 16384 // (_pow2(max(dim, dim_v)) * itemsize)))


#: Warps per program of the window and decode kernels on GPUs (4 leaves bf16 tiles at the 255-register limit).
WARPS = 8


def _stages(itemsize: int) -> int:
    """Software-pipelining depth: 3 for 16-bit inputs, 2 for fp32 (twice the bytes per tile)."""
    return 2 if itemsize >= 4 else 3


def _num_splits(tmax: int, programs: int, block_n: int, device: torch.device) -> int:
    """How many chunks to cut T into: enough programs to fill the GPU twice over, each chunk >= 2 key blocks."""
    most = max(1, min(64, triton.cdiv(tmax, 2 * block_n)))
    if device.type != "cuda":
        return min(most, 4)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(most, triton.cdiv(2 * sms, programs)))


@triton.jit
def _scaled_logits(s, scaling, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k -> logits in log2 units: s * scaling, optionally soft-capped as softcap * tanh(x / softcap)."""
    s = s * scaling
    if HAS_SOFTCAP:
        z = s / softcap
        e = tl.exp2(-2.8853900817779268 * tl.abs(z))  # tanh(|z|) = (1 - e) / (1 + e), overflow-free
        th = (1.0 - e) / (1.0 + e)
        s = softcap * tl.where(z < 0, -th, th)
    return s * 1.4426950408889634


# --------------------------------------------------------------------------------------------------------------
# 1. window scores: two passes, (a) row max / row sum per window query and key split, (b) normalised
#    probabilities summed per key, merging the splits' statistics on load
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _window_stats_kernel(
    q_ptr,
    k_ptr,
    valid_ptr,
    m_ptr,
    l_ptr,
    sqb,
    sqh,
    sqw,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svt,
    T,
    W,
    R,
    HKV,
    G,
    scaling,
    softcap,
    CHUNK,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Per window row (G query heads x W queries of one KV head) and per chunk of CHUNK keys (program axis 2):
    online max and sum of exp over the chunk's visible keys. Splitting T keeps the GPU busy when B x Hkv is small."""
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
    m_i = tl.full([BLOCK_R], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    k_base = k_ptr + b * skb + h * skh
    split = tl.program_id(2)
    end = tl.minimum((split + 1) * CHUNK, T)
    for start in range(split * CHUNK, end, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        col_ok = cols < end
        kb = tl.load(k_base + cols[:, None] * skt + d[None, :] * skd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = _scaled_logits(tl.dot(q, tl.trans(kb), input_precision=DOT_PREC), scaling, softcap, HAS_SOFTCAP)
        allowed = (cols[None, :] <= pos[:, None]) & col_ok[None, :]
        if HAS_VALID:
            key_ok = tl.load(valid_ptr + b * svb + cols * svt, mask=col_ok, other=0) != 0
            allowed = allowed & key_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    out = (pid_bh.to(tl.int64) * tl.num_programs(2) + split) * R + rows  # stats laid out (B, Hkv, S, R)
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(l_ptr + out, l_i, mask=row_ok)


@triton.jit
def _window_scores_kernel(
    q_ptr,
    k_ptr,
    valid_ptr,
    m_ptr,
    l_ptr,
    out_ptr,
    sqb,
    sqh,
    sqw,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svt,
    sob,
    soh,
    sot,
    T,
    W,
    R,
    HKV,
    G,
    scaling,
    softcap,
    S,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One block of keys of one KV head: sum over all window rows of exp(s - m) / denom, where each row's max m and
    sum denom merge its S pass-1 partials."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // HKV).to(tl.int64)
    h = (pid_bh % HKV).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    col_ok = cols < T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    kb = tl.load(
        k_ptr + b * skb + h * skh + cols[:, None] * skt + d[None, :] * skd,
        mask=col_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    key_ok = col_ok
    if HAS_VALID:
        key_ok = key_ok & (tl.load(valid_ptr + b * svb + cols * svt, mask=col_ok, other=0) != 0)
    acc = tl.zeros([BLOCK_T], tl.float32)
    stats = pid_bh.to(tl.int64) * S * R
    sp = tl.arange(0, BLOCK_S)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        qi = rows % W
        q_off = b * sqb + (h * G + rows // W)[:, None] * sqh + qi[:, None] * sqw + d[None, :] * sqd
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        part = stats + sp[:, None] * R + rows[None, :]
        part_ok = (sp < S)[:, None] & row_ok[None, :]
        m_part = tl.load(m_ptr + part, mask=part_ok, other=-1.0e30)
        m = tl.max(m_part, 0)
        denom = tl.sum(tl.load(l_ptr + part, mask=part_ok, other=0.0) * tl.exp2(m_part - m[None, :]), 0)
        seen = denom > 0  # denom >= 1 once a row saw a key; a row that saw none (padding) adds nothing
        inv_l = tl.where(seen, 1.0 / tl.maximum(denom, 1.0), 0.0)
        m = tl.where(seen, m, 0.0)
        s = _scaled_logits(tl.dot(q, tl.trans(kb), input_precision=DOT_PREC), scaling, softcap, HAS_SOFTCAP)
        allowed = (cols[None, :] <= (T - W + qi)[:, None]) & key_ok[None, :] & row_ok[:, None]
        p = tl.where(allowed, tl.exp2(s - m[:, None]), 0.0) * inv_l[:, None]
        acc += tl.sum(p, 0)
    tl.store(out_ptr + b * sob + h * soh + cols * sot, acc, mask=col_ok)


def window_scores(
    q: Tensor,
    k: Tensor,
    scaling: float,
    valid: Tensor | None = None,
    softcap: float | None = None,
    *,
    block_r: int | None = None,
    block_t: int | None = None,
    splits: int | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """(B, Hkv, T) fp32 window scores (see `reference.window_scores`); streams over T, two launches.

    Memory beyond the output is two fp32 statistics per window row and key split (B x Hq x W x S); no W x T tile
    outlives a block. `out` (any strides) receives the scores if given; block sizes and the number of key splits
    of the statistics pass may be forced (tests do).
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
    auto_r, auto_t = window_blocks(rows, dim, q.element_size())
    block_r, block_t = block_r or auto_r, block_t or min(auto_t, _pow2(tokens))
    row_blocks = triton.cdiv(rows, block_r)
    splits = splits or _num_splits(tokens, batch * kv_heads * row_blocks, block_t, k.device)
    chunk = triton.cdiv(triton.cdiv(tokens, splits), block_t) * block_t
    splits = triton.cdiv(tokens, chunk)  # every split starts inside T
    stats_m = _scratch(batch, kv_heads, splits, rows, device=k.device)
    stats_l = _scratch(batch, kv_heads, splits, rows, device=k.device)
    out = _check_out(out, (batch, kv_heads, tokens), torch.float32, k.device)
    if valid is not None:
        valid_t = valid.to(device=k.device, dtype=torch.int8)
        svb, svt = valid_t.stride()
    else:
        valid_t, svb, svt = stats_m, 0, 0
    strides = (*q.stride(), *k.stride(), svb, svt)
    sizes = (tokens, window, rows, kv_heads, groups, float(scaling), float(softcap or 1.0))
    strides_out = (*strides, *out.stride())
    meta = dict(
        D=dim,
        BLOCK_R=block_r,
        BLOCK_T=block_t,
        BLOCK_D=_pow2(dim),
        HAS_VALID=valid is not None,
        HAS_SOFTCAP=softcap is not None,
        DOT_PREC=_dot_precision(q.dtype),
        num_stages=_stages(q.element_size()),
        num_warps=WARPS,
    )
    _window_stats_kernel[(batch * kv_heads, row_blocks, splits)](
        q, k, valid_t, stats_m, stats_l, *strides, *sizes, chunk, **meta
    )
    _window_scores_kernel[(batch * kv_heads, triton.cdiv(tokens, block_t))](
        q, k, valid_t, stats_m, stats_l, out, *strides_out, *sizes, splits, BLOCK_S=_pow2(splits, 2), **meta
    )
    return out


# --------------------------------------------------------------------------------------------------------------
# 2. gather: compact K and V to kept token indices in one launch
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _gather_kv_kernel(
    k_ptr,
    v_ptr,
    idx_ptr,
    ko_ptr,
    vo_ptr,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    sib,
    sih,
    sij,
    sokb,
    sokh,
    sokt,
    sokd,
    sovb,
    sovh,
    sovt,
    sovd,
    K,
    HKV,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """One block of kept slots of one (batch, KV head): copy the indexed K and V rows into the outputs."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // HKV).to(tl.int64)
    h = (pid_bh % HKV).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_ok = j < K
    t = tl.load(idx_ptr + b * sib + h * sih + j * sij, mask=j_ok, other=0).to(tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    mk = j_ok[:, None] & (dk < DK)[None, :]
    kv = tl.load(k_ptr + b * skb + h * skh + t[:, None] * skt + dk[None, :] * skd, mask=mk)
    tl.store(ko_ptr + b * sokb + h * sokh + j[:, None] * sokt + dk[None, :] * sokd, kv, mask=mk)
    dv = tl.arange(0, BLOCK_DV)
    mv = j_ok[:, None] & (dv < DV)[None, :]
    vv = tl.load(v_ptr + b * svb + h * svh + t[:, None] * svt + dv[None, :] * svd, mask=mv)
    tl.store(vo_ptr + b * sovb + h * sovh + j[:, None] * sovt + dv[None, :] * sovd, vv, mask=mv)


def gather_kv(
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    *,
    block_k: int | None = None,
    k_out: Tensor | None = None,
    v_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(B, Hkv, K, D) copies of the rows `idx` (B, Hkv, K) of k and v; one launch moves both.

    k_out / v_out may be given (e.g. a slice of preallocated compressed storage, any strides) to write in place;
    otherwise new contiguous tensors are returned. Indices are not bounds-checked on the device (that would cost
    a sync): they must lie in [0, T).
    """
    batch, kv_heads, _, dim_k = k.shape
    dim_v = v.shape[-1]
    kept = idx.shape[-1]
    if idx.shape[:2] != (batch, kv_heads) or idx.dim() != 3:
        raise ValueError(f"idx must be (B, Hkv, K) with B, Hkv = {batch}, {kv_heads}, got {tuple(idx.shape)}")
    k_out = _check_out(k_out, (batch, kv_heads, kept, dim_k), k.dtype, k.device)
    v_out = _check_out(v_out, (batch, kv_heads, kept, dim_v), v.dtype, k.device)
    if kept == 0 or batch * kv_heads == 0:
        return k_out, v_out
    idx = idx.to(k.device)
    block_k = block_k or min(_pow2(kept, 1), 256 if INTERPRETED else max(1, 4096 // _pow2(max(dim_k, dim_v))))
    _gather_kv_kernel[(batch * kv_heads, triton.cdiv(kept, block_k))](
        k,
        v,
        idx,
        k_out,
        v_out,
        *k.stride(),
        *v.stride(),
        *idx.stride(),
        *k_out.stride(),
        *v_out.stride(),
        kept,
        kv_heads,
        DK=dim_k,
        DV=dim_v,
        BLOCK_K=block_k,
        BLOCK_DK=_pow2(dim_k, 1),
        BLOCK_DV=_pow2(dim_v, 1),
    )
    return k_out, v_out


# --------------------------------------------------------------------------------------------------------------
# 3. decode attention: flash-decoding, split the keys of each (batch, KV head) over programs, then combine
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    len_ptr,
    mo_ptr,
    mm_ptr,
    ml_ptr,
    sqb,
    sqh,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    slb,
    slh,
    TMAX,
    HKV,
    G,
    CHUNK,
    S,
    scaling,
    softcap,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    QK_PREC: tl.constexpr,
    PV_PREC: tl.constexpr,
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
    q = tl.load(
        q_ptr + b * sqb + (h * G + g)[:, None] * sqh + d[None, :] * sqd, mask=g_ok[:, None] & d_ok[None, :], other=0.0
    )
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
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
        vb = tl.load(
            v_base + cols[:, None] * svt + dv[None, :] * svd, mask=col_ok[:, None] & dv_ok[None, :], other=0.0
        ).to(tl.float32)  # 16-bit values are exact in fp32 (and in TF32)
        acc = acc * alpha[:, None] + tl.dot(p, vb, input_precision=PV_PREC)
        m_i = m_new
    slot = ((b * HKV + h) * G + g) * S + split  # partials laid out (B, Hq, S[, DV])
    tl.store(mm_ptr + slot, m_i, mask=g_ok)
    tl.store(ml_ptr + slot, l_i, mask=g_ok)
    tl.store(mo_ptr + slot[:, None] * DV + dv[None, :], acc, mask=g_ok[:, None] & dv_ok[None, :])


@triton.jit
def _decode_reduce_kernel(
    mo_ptr,
    mm_ptr,
    ml_ptr,
    out_ptr,
    sob,
    soh,
    sod,
    HQ,
    S,
    DV: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
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
    denom = tl.load(ml_ptr + slot, mask=s_ok, other=0.0)
    o = tl.load(mo_ptr + slot[:, None] * DV + dv[None, :], mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # empty splits (max -1e30) get weight 0
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w * denom, 0)
    tl.store(out_ptr + b * sob + qh * soh + dv * sod, out.to(out_ptr.dtype.element_ty), mask=dv_ok)


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
    out: Tensor | None = None,
) -> Tensor:
    """(B, Hq, Dv) in q's dtype: single-query attention over per-(batch, KV head) variable-length padded KV.

    Flash-decoding: grid (B * Hkv, splits), each program reads its chunk of keys once for all G query heads of
    the KV head; a second launch merges the fp32 partials. lengths (B, Hkv) must be >= 1 (0 gives NaN, as softmax
    over nothing does in the reference); lengths above Tmax are clamped. `out` (any strides) receives the result
    if given; splits and key block size may be forced (tests do).
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
    block_n = block_n or min(decode_block_n(dim, dim_v, q.element_size()), _pow2(tmax))
    splits = num_splits or _num_splits(tmax, batch * kv_heads, block_n, k.device)
    chunk = triton.cdiv(triton.cdiv(tmax, splits), block_n) * block_n
    splits = triton.cdiv(tmax, chunk)  # no split may start past Tmax
    part_m = _scratch(batch, q_heads, splits, device=k.device)
    part_l = _scratch(batch, q_heads, splits, device=k.device)
    part_o = _scratch(batch, q_heads, splits, dim_v, device=k.device)
    out = _check_out(out, (batch, q_heads, dim_v), q.dtype, k.device)
    _decode_split_kernel[(batch * kv_heads, splits)](
        q,
        k,
        v,
        lengths,
        part_o,
        part_m,
        part_l,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *lengths.stride(),
        tmax,
        kv_heads,
        groups,
        chunk,
        splits,
        float(scaling),
        float(softcap or 1.0),
        D=dim,
        DV=dim_v,
        BLOCK_G=_pow2(groups),
        BLOCK_N=block_n,
        BLOCK_D=_pow2(dim),
        BLOCK_DV=_pow2(dim_v),
        HAS_SOFTCAP=softcap is not None,
        QK_PREC=_dot_precision(q.dtype),
        PV_PREC=_dot_precision(v.dtype),
        num_stages=_stages(q.element_size()),
        num_warps=WARPS,
    )
    _decode_reduce_kernel[(batch * q_heads,)](
        part_o,
        part_m,
        part_l,
        out,
        *out.stride(),
        q_heads,
        splits,
        DV=dim_v,
        BLOCK_S=_pow2(splits, 2),
        BLOCK_DV=_pow2(dim_v, 1),
    )
    return out


# --------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation: prove every kernel lowers to GPU code, for the local GPU or any other target
# --------------------------------------------------------------------------------------------------------------

#: The kernels the launchers above start, in launch order (names accepted by `compile_kernel`).
KERNELS = ("window_stats", "window_scores", "gather_kv", "decode_split", "decode_reduce")
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_FLOATS = {"scaling": "fp32", "softcap": "fp32"}


def compile_kernel(
    name: str,
    dtype: torch.dtype = torch.bfloat16,
    dim: int = 128,
    groups: int = 4,
    window: int = 32,
    target: object | None = None,
) -> object:
    """Compile one of `KERNELS` without launching it, with the blocks, warps and stages its launcher picks.

    Inputs are `dtype` at head dim `dim` (K and V alike), GQA group `groups` and `window` window queries; the
    padding and softcap paths and the largest split count (64) are compiled in, the biggest variants. `target` (a
    `triton.backends.compiler.GPUTarget`) defaults to the local GPU; an explicit one needs no GPU. Returns triton's
    CompiledKernel (`.asm["cubin"]`, `.metadata.shared` bytes of shared memory).
    """
    if INTERPRETED:
        raise RuntimeError("the kernels were built for the Triton interpreter (TRITON_INTERPRET=1): nothing to compile")
    from triton.compiler.compiler import ASTSource

    dt, size = _TRITON_DTYPES[dtype], dtype.itemsize
    prec, block_d = _dot_precision(dtype), _pow2(dim)
    tuned = {"num_warps": WARPS, "num_stages": _stages(size)}  # window and decode kernels; the others keep defaults
    block_r, block_t = window_blocks(groups * window, dim, size)
    win = dict(
        D=dim, BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_D=block_d, HAS_VALID=True, HAS_SOFTCAP=True, DOT_PREC=prec
    )
    qk = {
        "q_ptr": f"*{dt}",
        "k_ptr": f"*{dt}",
        "valid_ptr": "*i8",
        "m_ptr": "*fp32",
        "l_ptr": "*fp32",
        "out_ptr": "*fp32",
    }
    kv = {"k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "idx_ptr": "*i64", "ko_ptr": f"*{dt}", "vo_ptr": f"*{dt}"}
    dec = {
        "q_ptr": f"*{dt}",
        "k_ptr": f"*{dt}",
        "v_ptr": f"*{dt}",
        "len_ptr": "*i64",
        "mo_ptr": "*fp32",
        "mm_ptr": "*fp32",
        "ml_ptr": "*fp32",
        "out_ptr": f"*{dt}",
    }
    block_dkv = _pow2(dim, 1)
    split = dict(
        D=dim,
        DV=dim,
        BLOCK_G=_pow2(groups),
        BLOCK_N=decode_block_n(dim, dim, size),
        BLOCK_D=block_d,
        BLOCK_DV=block_d,
        HAS_SOFTCAP=True,
        QK_PREC=prec,
        PV_PREC=prec,
    )
    builds = {
        "window_stats": (_window_stats_kernel, qk, win, tuned),
        "window_scores": (_window_scores_kernel, qk, dict(win, BLOCK_S=64), tuned),
        "gather_kv": (
            _gather_kv_kernel,
            kv,
            dict(DK=dim, DV=dim, BLOCK_K=max(1, 4096 // block_dkv), BLOCK_DK=block_dkv, BLOCK_DV=block_dkv),
            {},
        ),
        "decode_split": (_decode_split_kernel, dec, split, tuned),
        "decode_reduce": (_decode_reduce_kernel, dec, dict(DV=dim, BLOCK_S=64, BLOCK_DV=block_dkv), {}),
    }
    if name not in builds:
        raise ValueError(f"unknown kernel {name!r}; one of {', '.join(KERNELS)}")
    fn, pointers, constexprs, options = builds[name]
    types = {**_FLOATS, **pointers}
    signature = {arg: "constexpr" if arg in constexprs else types.get(arg, "i32") for arg in fn.arg_names}
    target = target or triton.runtime.driver.active.get_current_target()
    parsed = triton.compiler.make_backend(target).parse_options(options)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=target, options=parsed.__dict__)
