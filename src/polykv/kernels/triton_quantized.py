"""Triton decode attention over a quantized KV store, dequantizing in its loads, and its Python launcher.

The store (`polykv.quantized_tokens.QuantizedTokens`) is a sequence of chunks in the layout of `polykv.quantize`:
per batch row, packed codes (8 bits: one per byte; 4: two; 2: four, code i of a byte in bits [i*bits, (i+1)*bits))
in the order of the tensor with its quantized axis moved last, and one scale and zero point per group in the model's
dtype. Keys are quantized per channel, so key code (h, t, d) of a chunk of n tokens is element (h * D + d) * n + t
of its row and its group is t // group; values per token, so value code (h, t, d) is element (h * n + t) * Dv + d and
its group d // group. No dequantized K or V is ever written to memory: each key and value block is unpacked, scaled
and shifted in registers, rounded to the model's dtype (so the kernel sees exactly what `quantize.dequantize` gives)
and used at once.

Flash-decoding, as `triton_kernels.decode_attention`: one launch per chunk, grid (B * Hkv, splits), each program
reads a run of the chunk's tokens once for the G query heads of its KV head and writes fp32 partials (running max,
sum, unnormalised output) to its slot; one merge launch then combines all slots of a query head. Chunks may have
different lengths and group sizes (a chunk shorter than the group has its group clamped); launches are per chunk, so
a store of many small chunks costs one launch each. Semantics are those of `quantized_reference`.

Written for CUDA GPUs and tested on CPU with the Triton interpreter (TRITON_INTERPRET=1 set before import).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from polykv.kernels.quantized_reference import additive_mask, key_lengths
from polykv.kernels.reference import check_gqa
from polykv.quantize import KEY_AXIS, VALUE_AXIS, Quantized
from polykv.quantized_tokens import QuantizedTokens

#: Whether the kernels below were built for the CPU interpreter (decided when this module was imported).
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Tests set this to fill scratch buffers with NaN, so a partial result a kernel forgot to write shows up.
POISON_SCRATCH: bool = False
#: The kernels the launcher starts, in launch order (names accepted by `compile_kernel`).
KERNELS = ("quantized_split", "quantized_merge")
#: Warps per split program on GPUs; slots merged per step of the merge kernel.
WARPS = 8
MERGE_BLOCK = 64
PACKED_BITS = (8, 4, 2)

# Kernels spell log2(e) = 1.4426950408889634 (softmax runs in base 2) and -1.0e30, a finite "minus infinity" for
# running maxima that keeps exp2(m_old - m_new) at 1, not NaN, while a row has seen no key yet.


def _pow2(n: int, low: int = 16) -> int:
    """Smallest power of two >= n and >= low (tl.arange needs powers of two, tl.dot at least 16)."""
    return max(low, triton.next_power_of_2(max(n, 1)))


def block_tokens(dim: int, dim_v: int, itemsize: int) -> int:
    """Tokens per step of the split kernel: dequantized K and V tiles of at most 16 KiB each for 16-bit inputs, so
    shared memory stays under 48 KiB at head dims up to 256 (measured by compiling for sm_80 and sm_90). fp32 tiles
    reach the IEEE dot through large shared staging buffers, so they are 8 KiB (83 KiB of shared memory at head dims
    64-128, 163 KiB at 256: fp32 is a correctness path, not a tuned one)."""
    if INTERPRETED:  # few, large programs: the interpreter's cost is per program and per loop step
        return 128
    tile = 16384 if itemsize <= 2 else 8192
    return max(16, min(64, tile // (_pow2(max(dim, dim_v)) * itemsize)))


def _splits(tokens: int, programs: int, block_n: int, device: torch.device) -> int:
    """How many runs to cut a chunk's tokens into: about two programs per SM, each run >= 2 token blocks."""
    most = max(1, min(64, triton.cdiv(tokens, 2 * block_n)))
    if device.type != "cuda":
        return min(most, 4)
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(index).multi_processor_count
    return max(1, min(most, triton.cdiv(2 * sms, programs)))


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots for fp32 inputs (TF32 would miss a 1e-4 tolerance); 16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _scratch(*shape: int, device: torch.device) -> Tensor:
    if POISON_SCRATCH:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


@triton.jit
def _dequantized(data_row, sc_base, zp_base, code_idx, sc_off, ok, OUT_DTYPE: tl.constexpr, BITS: tl.constexpr):
    """Codes at `code_idx` of one packed row, times their scale plus their zero point (at `sc_off`), computed in
    fp32 and rounded to OUT_DTYPE, as `quantize.dequantize` does; 0 where not `ok`."""
    if BITS == 8:
        code = tl.load(data_row + code_idx, mask=ok, other=0).to(tl.float32)
    else:
        per: tl.constexpr = 8 // BITS
        byte = tl.load(data_row + code_idx // per, mask=ok, other=0).to(tl.int32)
        shift = ((code_idx % per) * BITS).to(tl.int32)
        code = ((byte >> shift) & ((1 << BITS) - 1)).to(tl.float32)
    scale = tl.load(sc_base + sc_off, mask=ok, other=0.0).to(tl.float32)
    zero = tl.load(zp_base + sc_off, mask=ok, other=0.0).to(tl.float32)
    return (code * scale + zero).to(OUT_DTYPE)


@triton.jit
def _quantized_split_kernel(
    q_ptr,
    kd_ptr,
    ks_ptr,
    kz_ptr,
    vd_ptr,
    vs_ptr,
    vz_ptr,
    mask_ptr,
    len_ptr,
    mo_ptr,
    mm_ptr,
    ml_ptr,
    sqb,
    sqh,
    sqd,
    skdb,
    sksb,
    sksh,
    sksd,
    sksg,
    svdb,
    svsb,
    svsh,
    svst,
    svsg,
    smb,
    smh,
    smg,
    smt,
    slb,
    slh,
    N,
    FIRST,
    BASE,
    HKV,
    G,
    CHUNK,
    S,
    SLOT0,
    GK,
    GV,
    scaling,
    D: tl.constexpr,
    DV: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LEN: tl.constexpr,
    QK_PREC: tl.constexpr,
    PV_PREC: tl.constexpr,
):
    """Tokens [FIRST + split * CHUNK, next split) of one chunk of N tokens (store position BASE + t - FIRST) for
    one KV head against its G queries: unnormalised output, running max and sum per query head, written to slot
    SLOT0 + split (an empty run writes max=-1e30, sum=0)."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = (pid_bh % HKV).to(tl.int64)
    start = FIRST + split * CHUNK
    end = tl.minimum(start + CHUNK, N)
    if HAS_LEN:
        end = tl.minimum(end, FIRST + tl.load(len_ptr + b * slb + h * slh).to(tl.int32) - BASE)
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
    k_row = kd_ptr + b * skdb
    ks_base = ks_ptr + b * sksb + h * sksh
    kz_base = kz_ptr + b * sksb + h * sksh
    v_row = vd_ptr + b * svdb
    vs_base = vs_ptr + b * svsb + h * svsh
    vz_base = vz_ptr + b * svsb + h * svsh
    for n0 in range(start, end, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        t_ok = t < end
        k_ok = t_ok[:, None] & d_ok[None, :]
        k_idx = (h * D + d[None, :]) * N + t[:, None]  # keys: codes of (h, d) run along the tokens
        k_sc = d[None, :] * sksd + (t[:, None] // GK) * sksg
        kb = _dequantized(k_row, ks_base, kz_base, k_idx, k_sc, k_ok, q_ptr.dtype.element_ty, BITS)
        s = tl.dot(q, tl.trans(kb), input_precision=QK_PREC) * (scaling * 1.4426950408889634)
        if HAS_MASK:
            m_off = b * smb + (h * smh + g * smg)[:, None] + (BASE + t - FIRST)[None, :] * smt
            added = tl.load(mask_ptr + m_off, mask=g_ok[:, None] & t_ok[None, :], other=0.0).to(tl.float32)
            s = s + added * 1.4426950408889634
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ok = t_ok[:, None] & dv_ok[None, :]
        v_idx = (h * N + t[:, None]) * DV + dv[None, :]  # values: codes of (h, t) run along the channels
        v_sc = t[:, None] * svst + (dv[None, :] // GV) * svsg
        vb = _dequantized(v_row, vs_base, vz_base, v_idx, v_sc, v_ok, q_ptr.dtype.element_ty, BITS)
        acc = acc * alpha[:, None] + tl.dot(p, vb.to(tl.float32), input_precision=PV_PREC)
        m_i = m_new
    slot = ((b * HKV + h) * G + g) * S + SLOT0 + split  # partials laid out (B, Hq, S[, DV])
    tl.store(mm_ptr + slot, m_i, mask=g_ok)
    tl.store(ml_ptr + slot, l_i, mask=g_ok)
    tl.store(mo_ptr + slot[:, None] * DV + dv[None, :], acc, mask=g_ok[:, None] & dv_ok[None, :])


@triton.jit
def _quantized_merge_kernel(
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
    """Combine the S partial (max, sum, output) triples of one query head, BLOCK_S at a time: first the overall
    max, then the rescaled sums; empty slots (max -1e30) get weight 0."""
    pid = tl.program_id(0)
    b = (pid // HQ).to(tl.int64)
    qh = (pid % HQ).to(tl.int64)
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < DV
    base = pid.to(tl.int64) * S
    top = tl.full([BLOCK_S], -1.0e30, tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        top = tl.maximum(top, tl.load(mm_ptr + base + s, mask=s < S, other=-1.0e30))
    m = tl.max(top, 0)
    denom = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < S
        w = tl.exp2(tl.load(mm_ptr + base + s, mask=s_ok, other=float("-inf")) - m)
        denom += w * tl.load(ml_ptr + base + s, mask=s_ok, other=0.0)
        o = tl.load(mo_ptr + (base + s)[:, None] * DV + dv[None, :], mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
    out = acc / tl.sum(denom, 0)
    tl.store(out_ptr + b * sob + qh * soh + dv * sod, out.to(out_ptr.dtype.element_ty), mask=dv_ok)


def _checked_chunk(q: Quantized, axis: int, dtype: torch.dtype, device: torch.device) -> Quantized:
    """`q` if the kernel can read it as a chunk quantized along `axis` (packed rows of unit stride; scales and
    zero points with equal strides), else a ValueError / TypeError."""
    if not isinstance(q, Quantized):
        raise TypeError("the quantized kernel reads packed chunks (bits 8, 4, 2); a 16-bit store has plain tensors")
    if q.bits not in PACKED_BITS or q.axis != axis or q.dtype != dtype or q.data.device != device:
        raise ValueError(f"chunk of {q.bits} bits along axis {q.axis} in {q.dtype} on {q.data.device} cannot be read")
    if q.data.stride(-1) != 1 or q.scales.stride() != q.zeros.stride():
        raise ValueError("chunk storage is not in quantize's layout (packed rows of unit stride)")
    return q


def quantized_decode_attention(
    q: Tensor,
    store: QuantizedTokens,
    scaling: float,
    mask: Tensor | None = None,
    lengths: Tensor | None = None,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """(B, Hq, 1, Dv) in q's dtype: each query q (B, Hq, 1, D) attending over the tokens of `store`.

    `mask` (B or 1, 1 | Hkv | Hq, 1, N) additive or boolean, `lengths` (B,) or (B, Hkv): see
    `quantized_reference.quantized_decode_attention`, whose result this is up to fp32 rounding. `num_splits` (runs
    per chunk) and `block_n` (tokens per step) may be forced (tests do); `out` (any strides) receives the result.
    """
    batch, q_heads, q_len, dim = q.shape
    if q_len != 1:
        raise ValueError(f"decode attention takes one query per head, got {q_len}")
    if not store.keys:
        raise ValueError("the quantized store holds no tokens")
    dtype, device = q.dtype, q.device
    keys = [_checked_chunk(k, KEY_AXIS, dtype, device) for k in store.keys]
    values = [_checked_chunk(v, VALUE_AXIS, dtype, device) for v in store.values]
    _, kv_heads, _, dim_k = keys[0].shape
    dim_v = values[0].shape[-1]
    groups = check_gqa(q_heads, kv_heads)
    if dim_k != dim or keys[0].shape[0] != batch:
        raise ValueError(f"queries {tuple(q.shape)} do not match keys {keys[0].shape}")
    tokens = store.tokens
    lens, sl = q, (0, 0)  # q stands in for the pointers of an absent length or mask tensor
    if lengths is not None:
        lens = key_lengths(lengths.to(device), batch, kv_heads)
        sl = lens.stride()
    added, sm = q, (0, 0, 0, 0)
    if mask is not None:
        added = additive_mask(mask.to(device), q_heads, kv_heads, tokens, dtype)
        if added.shape[0] not in (1, batch):
            raise ValueError(f"mask batch {added.shape[0]} is neither 1 nor {batch}")
        smb = added.stride(0) if added.shape[0] == batch else 0
        smh = 0 if added.shape[1] == 1 else added.stride(1)
        # mask head of query head h * G + g: that head (Hq heads), KV head h (Hkv heads) or the only one
        sm = (smb, smh * groups, smh, added.stride(3)) if added.shape[1] == q_heads else (smb, smh, 0, added.stride(3))
    block_n = block_n or min(block_tokens(dim, dim_v, q.element_size()), _pow2(tokens))
    launches, slots, base = [], 0, 0
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        first = store.skip if i == 0 else 0
        seen = k.shape[2] - first
        splits = num_splits or _splits(seen, batch * kv_heads, block_n, device)
        run = triton.cdiv(triton.cdiv(seen, splits), block_n) * block_n
        splits = triton.cdiv(seen, run)
        launches.append((k, v, first, base, run, splits, slots))
        slots, base = slots + splits, base + seen
    part_m = _scratch(batch, q_heads, slots, device=device)
    part_l = _scratch(batch, q_heads, slots, device=device)
    part_o = _scratch(batch, q_heads, slots, dim_v, device=device)
    if out is None:
        out = torch.empty(batch, q_heads, 1, dim_v, dtype=dtype, device=device)
    elif out.shape != (batch, q_heads, 1, dim_v) or out.dtype != dtype or out.device != device:
        raise ValueError(f"out must be {(batch, q_heads, 1, dim_v)} {dtype} on {device}, got {tuple(out.shape)}")
    meta = dict(
        D=dim,
        DV=dim_v,
        BITS=store.bits,
        BLOCK_G=_pow2(groups),
        BLOCK_N=block_n,
        BLOCK_D=_pow2(dim),
        BLOCK_DV=_pow2(dim_v),
        HAS_MASK=mask is not None,
        HAS_LEN=lengths is not None,
        QK_PREC=_dot_precision(dtype),
        PV_PREC=_dot_precision(dtype),
        num_warps=WARPS,
    )
    for k, v, first, base, run, splits, slot0 in launches:
        _quantized_split_kernel[(batch * kv_heads, splits)](
            q,
            k.data,
            k.scales,
            k.zeros,
            v.data,
            v.scales,
            v.zeros,
            added,
            lens,
            part_o,
            part_m,
            part_l,
            q.stride(0),
            q.stride(1),
            q.stride(3),
            k.data.stride(0),
            *k.scales.stride(),
            v.data.stride(0),
            *v.scales.stride(),
            *sm,
            *sl,
            k.shape[2],
            first,
            base,
            kv_heads,
            groups,
            run,
            slots,
            slot0,
            k.group,
            v.group,
            float(scaling),
            **meta,
        )
    _quantized_merge_kernel[(batch * q_heads,)](
        part_o,
        part_m,
        part_l,
        out,
        out.stride(0),
        out.stride(1),
        out.stride(3),
        q_heads,
        slots,
        DV=dim_v,
        BLOCK_S=min(_pow2(slots, 2), MERGE_BLOCK),
        BLOCK_DV=_pow2(dim_v, 1),
    )
    return out


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_kernel(
    name: str,
    dtype: torch.dtype = torch.bfloat16,
    dim: int = 128,
    groups: int = 4,
    bits: int = 4,
    target: object | None = None,
) -> object:
    """Compile one of `KERNELS` without launching it, with the blocks and warps the launcher picks.

    Inputs are `dtype` at head dim `dim` (K and V alike), GQA group `groups` and `bits`-bit codes, with the mask and
    length paths compiled in (the biggest variant). `target` (a `triton.backends.compiler.GPUTarget`) defaults to
    the local GPU; an explicit one needs no GPU. Returns triton's CompiledKernel (`.asm["cubin"]`,
    `.metadata.shared` bytes of shared memory, `.n_spills` once loaded).
    """
    if INTERPRETED:
        raise RuntimeError("the kernels were built for the Triton interpreter (TRITON_INTERPRET=1): nothing to compile")
    from triton.compiler.compiler import ASTSource

    dt, prec = _TRITON_DTYPES[dtype], _dot_precision(dtype)
    pointers = {name: f"*{dt}" for name in ("q_ptr", "ks_ptr", "kz_ptr", "vs_ptr", "vz_ptr", "mask_ptr", "out_ptr")}
    pointers |= {"kd_ptr": "*u8", "vd_ptr": "*u8", "len_ptr": "*i64", "scaling": "fp32"}
    pointers |= {name: "*fp32" for name in ("mo_ptr", "mm_ptr", "ml_ptr")}
    split = dict(
        D=dim,
        DV=dim,
        BITS=bits,
        BLOCK_G=_pow2(groups),
        BLOCK_N=block_tokens(dim, dim, dtype.itemsize),
        BLOCK_D=_pow2(dim),
        BLOCK_DV=_pow2(dim),
        HAS_MASK=True,
        HAS_LEN=True,
        QK_PREC=prec,
        PV_PREC=prec,
    )
    builds = {
        "quantized_split": (_quantized_split_kernel, split, {"num_warps": WARPS}),
        "quantized_merge": (_quantized_merge_kernel, dict(DV=dim, BLOCK_S=MERGE_BLOCK, BLOCK_DV=_pow2(dim, 1)), {}),
    }
    if name not in builds:
        raise ValueError(f"unknown kernel {name!r}; one of {', '.join(KERNELS)}")
    fn, constexprs, options = builds[name]
    signature = {arg: "constexpr" if arg in constexprs else pointers.get(arg, "i32") for arg in fn.arg_names}
    target = target or triton.runtime.driver.active.get_current_target()
    parsed = triton.compiler.make_backend(target).parse_options(options)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=target, options=parsed.__dict__)
