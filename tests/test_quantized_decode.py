"""Decode attention over a quantized KV store: the Triton kernel against its torch reference, the reference against
plain attention, the packed layout the kernel assumes, and the dispatcher.

Without CUDA the kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1, set before the kernels are
imported); without triton the module is skipped. The interpreter computes bf16 wrongly, so on CPU the 16-bit tests
use fp16 and bf16 runs only on CUDA. Outputs and scratch buffers are NaN-poisoned, so an element no program wrote
fails. A slow test compiles the kernels to cubin for sm_80/sm_90 without a GPU, which the interpreter never does.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import polykv.kernels as kernels  # noqa: E402
from polykv.kernels import quantized_reference as qref  # noqa: E402
from polykv.kernels import reference  # noqa: E402
from polykv.kernels import triton_quantized as tq  # noqa: E402
from polykv.quantize import dequantize  # noqa: E402
from polykv.quantized_tokens import QuantizedTokens  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs CUDA (interpreter bf16 is wrong)")


@pytest.fixture(autouse=True)
def poison_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tq, "POISON_SCRATCH", True)


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded from the test id: fresh inputs for every test, reproducible run to run."""
    return torch.Generator(device=DEVICE).manual_seed(zlib.crc32(request.node.nodeid.encode()))


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


def make_store(gen, bits, batch, kv_heads, sizes, dim, dtype, dim_v=None, skip=0, group=32) -> QuantizedTokens:
    """A store of one chunk per entry of `sizes` (tokens), without its first `skip` tokens."""
    store = QuantizedTokens(bits, group)
    for n in sizes:
        keys = randn(gen, batch, kv_heads, n, dim, dtype=dtype)
        store = store.append(keys, randn(gen, batch, kv_heads, n, dim_v or dim, dtype=dtype))
    return store.drop_first(skip)


def kernel(q, store, scaling, mask=None, lengths=None, **launch) -> torch.Tensor:
    """The kernel writing into a NaN-filled output, which it must return."""
    out = torch.full((*q.shape[:3], store.values[0].shape[-1]), float("nan"), dtype=q.dtype, device=DEVICE)
    got = tq.quantized_decode_attention(q, store, scaling, mask, lengths, out=out, **launch)
    assert got.data_ptr() == out.data_ptr()
    return got


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Elementwise relative error <= tol, with an absolute floor of tol x the largest expected magnitude."""
    assert not actual.isnan().any(), "kernel left unwritten (NaN-poisoned) or NaN elements"
    scale = expected.abs().max().float().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


# ---------------------------------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("groups", [1, 2])
@DTYPES
def test_kernel_matches_reference(gen, bits, groups, dtype):
    """45 tokens: a full key group of 32 and a partial one; several splits and token blocks per program."""
    store = make_store(gen, bits, 2, 2, [45], 16, dtype)
    q = randn(gen, 2, 2 * groups, 1, 16, dtype=dtype)
    expected = qref.quantized_decode_attention(q, store, 0.4)
    assert_close(kernel(q, store, 0.4, num_splits=2, block_n=16), expected, TOL[dtype])


@pytest.mark.parametrize("bits", [4, 2])
@DTYPES
def test_chunks_skip_lengths_and_masks(gen, bits, dtype):
    """Three chunks (the last shorter than a group, so its key group is clamped), the first partly dropped; value
    groups of 32 + 16 channels; GQA 3; per-KV-head lengths; additive and boolean masks of every head layout."""
    batch, kv_heads, groups, dim = 2, 2, 3, 48
    store = make_store(gen, bits, batch, kv_heads, [37, 32, 5], dim, dtype, dim_v=40, skip=3)
    n = store.tokens
    assert n == 71
    q = randn(gen, batch, 1, kv_heads * groups, dim, dtype=dtype).transpose(1, 2)  # (B, Hq, 1, D) as a view
    lengths = torch.tensor([[1, n], [40, 66]], device=DEVICE)
    additive = randn(gen, batch, kv_heads * groups, 1, n, dtype=dtype)
    additive[:, :, :, 30:50] = float("-inf")
    visible = torch.rand(batch, kv_heads, 1, n, generator=gen, device=DEVICE) > 0.3
    visible[..., 0] = True  # lengths of 1 still see a token
    cases = [
        dict(lengths=lengths),
        dict(lengths=lengths[:, 0]),
        dict(mask=additive),
        dict(mask=visible, lengths=lengths),
        dict(mask=additive[:1, :1]),  # one mask for every row and head
    ]
    for case in cases:
        expected = qref.quantized_decode_attention(q, store, 0.3, **case)
        assert_close(kernel(q, store, 0.3, **case, num_splits=2, block_n=16), expected, TOL[dtype])
    assert_close(kernel(q, store, 0.3), qref.quantized_decode_attention(q, store, 0.3), TOL[dtype])  # default launch


def test_kernel_rejects_what_it_cannot_read(gen):
    store = make_store(gen, 4, 1, 1, [8], 16, torch.float32)
    q = randn(gen, 1, 2, 1, 16)
    with pytest.raises(ValueError, match="one query"):
        tq.quantized_decode_attention(torch.cat([q, q], dim=2), store, 0.3)
    with pytest.raises(ValueError, match="no tokens"):
        tq.quantized_decode_attention(q, QuantizedTokens(4, 32), 0.3)
    with pytest.raises(ValueError, match="cannot be read"):  # keys and values swapped: wrong quantization axes
        tq.quantized_decode_attention(q, replace(store, keys=store.values, values=store.keys), 0.3)
    with pytest.raises(TypeError, match="16-bit"):
        tq.quantized_decode_attention(q, make_store(gen, 16, 1, 1, [8], 16, torch.float32), 0.3)


# ---------------------------------------------------------------------------------------------- packed layout


def mutate_top_code(chunk, element: int):
    """`chunk` with the code of row-0 element `element` (the last field of its byte) flipped to another level."""
    per = 8 // chunk.bits
    assert element % per == per - 1
    data = chunk.data.clone()
    data[0, element // per] ^= ((1 << chunk.bits) - 1) << (chunk.bits * (per - 1))
    return replace(chunk, data=data)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("side", ["keys", "values"])
def test_unpacking_order_is_the_storage_order(gen, bits, side):
    """Flip one code at the high end of a byte: dequantize must change exactly the (head, token, channel) the
    kernel's index formulas name, the reference output must move, and the kernel must follow it; a kernel reading
    the fields of a byte in the other order, or the codes in another axis order, reads a different element."""
    heads, n, dim = 2, 12, 16
    store = make_store(gen, bits, 1, heads, [n], dim, torch.float32)
    per = 8 // bits
    h, t, d = 1, 5, 9
    if side == "keys":  # per channel: codes of (h, d) run along the tokens
        element = (h * dim + d) * n + t
    else:  # per token: codes of (h, t) run along the channels
        element = (h * n + t) * dim + d
    element += per - 1 - element % per  # the last field of that byte
    if side == "keys":
        h, rest = divmod(element, dim * n)
        d, t = divmod(rest, n)
    else:
        h, rest = divmod(element, n * dim)
        t, d = divmod(rest, dim)
    chunks = getattr(store, side)
    mutated = replace(store, **{side: (mutate_top_code(chunks[0], element),)})
    before, after = dequantize(chunks[0]), dequantize(getattr(mutated, side)[0])
    changed = (before != after).nonzero().tolist()
    assert changed == [[0, h, t, d]]
    q = randn(gen, 1, heads, 1, dim)
    near = ((torch.arange(n, device=DEVICE) - t).abs() <= 1).view(1, 1, 1, n)  # weight on the flipped token
    original = qref.quantized_decode_attention(q, store, 0.5, near)
    expected = qref.quantized_decode_attention(q, mutated, 0.5, near)
    assert (expected - original).abs().max() > 0.01 * original.abs().max()
    assert_close(kernel(q, mutated, 0.5, near, block_n=16), expected, TOL[torch.float32])


# ---------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("groups", [1, 3])
def test_reference_is_plain_attention_on_the_dequantized_tokens(gen, groups):
    store = make_store(gen, 8, 2, 2, [20, 32], 16, torch.float32, skip=4)
    keys = torch.cat([dequantize(k) for k in store.keys], dim=2)[:, :, 4:]
    values = torch.cat([dequantize(v) for v in store.values], dim=2)[:, :, 4:]
    n = store.tokens
    q = randn(gen, 2, 2 * groups, 1, 16)
    lengths = torch.tensor([[n, 3], [17, n]], device=DEVICE)
    plain = reference.decode_attention(q[:, :, 0], keys, values, lengths, 0.3)
    assert_close(qref.quantized_decode_attention(q, store, 0.3, lengths=lengths)[:, :, 0], plain, 1e-5)
    visible = torch.arange(n, device=DEVICE)[None, None, None, :] < lengths[:, :, None, None]  # (B, Hkv, 1, N)
    assert_close(qref.quantized_decode_attention(q, store, 0.3, mask=visible)[:, :, 0], plain, 1e-5)


# ---------------------------------------------------------------------------------------------- dispatcher


def test_dispatcher_routes_and_records(gen, monkeypatch):
    store = make_store(gen, 2, 1, 2, [40], 16, torch.float32)
    q = randn(gen, 1, 4, 1, 16)
    expected = qref.quantized_decode_attention(q, store, 0.3)
    for choice in ("torch", "triton"):
        monkeypatch.setenv(kernels.ENV_VAR, choice)
        with kernels.recording() as ran:
            assert_close(kernels.quantized_decode_attention(q, store, 0.3), expected, TOL[torch.float32])
        assert ran == {"quantized decode": {choice}}
    full = make_store(gen, 16, 1, 2, [40], 16, torch.float32)  # plain tensors: torch even where Triton is forced
    with kernels.recording() as ran:
        kernels.quantized_decode_attention(q, full, 0.3)
    assert ran == {"quantized decode": {"torch"}}


# ---------------------------------------------------------------------------------------------- CUDA and compilation


@CUDA_ONLY
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_bf16_on_cuda(gen, bits):
    store = make_store(gen, bits, 2, 4, [1000, 32, 32], 128, torch.bfloat16, skip=10)
    q = randn(gen, 2, 28, 1, 128, dtype=torch.bfloat16)
    lengths = torch.randint(1, store.tokens + 1, (2, 4), generator=gen, device=DEVICE)
    expected = qref.quantized_decode_attention(q, store, 0.09, lengths=lengths)
    assert_close(kernel(q, store, 0.09, lengths=lengths), expected, TOL[torch.bfloat16])


AOT_SCRIPT = r"""
import sys
from triton.backends.compiler import GPUTarget
from polykv.kernels import triton_quantized as tq

for bits in (8, 4, 2):
    for name in tq.KERNELS:
        cc = tq.compile_kernel(name, bits=bits, target=GPUTarget("cuda", int(sys.argv[1]), 32))
        assert cc.asm["cubin"], name
        print(name, bits, cc.metadata.shared)
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu(arch):
    """The interpreter never lowers the kernels: compile both to cubin for Ampere/Hopper (bf16, D=128, G=4, each
    bit width) with the launcher's blocks, in a process without TRITON_INTERPRET; shared memory must fit 99 KiB."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", AOT_SCRIPT, str(arch)], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    shared = [int(line.split()[2]) for line in run.stdout.splitlines()]
    assert len(shared) == 6 and max(shared) <= 99 * 1024, run.stdout
