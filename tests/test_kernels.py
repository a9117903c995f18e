"""Triton kernels against the torch references, the references against naive formulas, and the dispatcher.

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set below before the kernels are
imported). The interpreter computes bf16 wrongly, so on CPU the 16-bit tests use fp16; bf16 runs only on CUDA.
Outputs and kernel scratch buffers are NaN-poisoned before every call, so an element no program wrote fails.
A slow test compiles the kernels to cubin for sm_80/sm_90 without a GPU, which the interpreter never does.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

import polykv.kernels as kernels  # noqa: E402
from polykv.kernels import reference  # noqa: E402
from polykv.kernels import triton_kernels as tk  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32_TOL = 1e-4
HALF_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GROUPS = [1, 3, 7]
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs CUDA (interpreter bf16 is wrong)")


@pytest.fixture(autouse=True)
def poison_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tk, "POISON_SCRATCH", True)


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded from the test id: fresh inputs for every test, reproducible run to run."""
    return torch.Generator(device=DEVICE).manual_seed(zlib.crc32(request.node.nodeid.encode()))


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


def nans(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Elementwise relative error <= tol, with an absolute floor of tol x the largest expected magnitude."""
    assert not actual.isnan().any(), "kernel left unwritten (NaN-poisoned) or NaN elements"
    expected = expected.to(actual.dtype)
    scale = expected.abs().max().float().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


def left_padding(gen: torch.Generator, batch: int, tokens: int, pad_last: int) -> torch.Tensor:
    """(B, T) validity: row 0 unpadded, the last row with `pad_last` left-padding columns, others random."""
    pads = torch.randint(0, max(pad_last, 1), (batch,), generator=gen, device=DEVICE)
    pads[0], pads[-1] = 0, pad_last
    return torch.arange(tokens, device=DEVICE)[None, :] >= pads[:, None]


# ---------------------------------------------------------------------------------------------- naive formulas


def naive_window_scores(q, k, scaling, valid, softcap):
    """Full (B, Hq, W, T) logits with K repeated per query head: the definition, without any memory care."""
    batch, q_heads, window, _ = q.shape
    tokens = k.shape[2]
    groups = q_heads // k.shape[1]
    logits = q.double() @ k.double().repeat_interleave(groups, dim=1).transpose(-1, -2) * scaling
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    pos = torch.arange(tokens - window, tokens, device=q.device)
    allowed = torch.arange(tokens, device=q.device)[None, :] <= pos[:, None]
    allowed = allowed[None, None] & (valid[:, None, None, :] if valid is not None else True)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs.sum(dim=2).view(batch, -1, groups, tokens).sum(dim=2).float()


def naive_decode(q, k, v, lengths, scaling, softcap):
    """Loop over (batch, query head) with an explicit slice of the valid keys."""
    batch, q_heads, _ = q.shape
    groups = q_heads // k.shape[1]
    out = torch.empty(batch, q_heads, v.shape[-1], dtype=torch.float64, device=q.device)
    for b in range(batch):
        for h in range(q_heads):
            n = int(lengths[b, h // groups])
            logits = k[b, h // groups, :n].double() @ q[b, h].double() * scaling
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            out[b, h] = torch.softmax(logits, dim=0) @ v[b, h // groups, :n].double()
    return out.to(q.dtype)


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_reference_window_scores_matches_naive(gen, monkeypatch, groups, softcap):
    batch, kv_heads, window, tokens, dim = 3, 2, 6, 29, 8
    q = randn(gen, batch, kv_heads * groups, window, dim)
    k = randn(gen, batch, kv_heads, tokens, dim)
    valid = left_padding(gen, batch, tokens, pad_last=tokens - 3)  # last row: window rows on padding see nothing
    expected = naive_window_scores(q, k, 0.4, valid, softcap)
    assert_close(reference.window_scores(q, k, 0.4, valid, softcap), expected, FP32_TOL)
    # tiny logit budgets force the head-chunk and row-chunk loops
    for budget in (batch * groups * window * tokens, batch * tokens * 2, 1):
        monkeypatch.setattr(reference, "MAX_LOGITS", budget)
        assert_close(reference.window_scores(q, k, 0.4, valid, softcap), expected, FP32_TOL)
    assert_close(
        reference.window_scores(q, k, 0.4, None, softcap), naive_window_scores(q, k, 0.4, None, softcap), FP32_TOL
    )


@pytest.mark.parametrize("groups", GROUPS)
def test_reference_decode_and_gather_match_naive(gen, groups):
    batch, kv_heads, tmax, dim = 2, 2, 13, 8
    q = randn(gen, batch, kv_heads * groups, dim)
    k, v = randn(gen, batch, kv_heads, tmax, dim), randn(gen, batch, kv_heads, tmax, dim + 4)
    lengths = torch.tensor([[1, tmax], [5, 9]], device=DEVICE)
    for softcap in (None, 2.5):
        expected = naive_decode(q, k, v, lengths, 0.3, softcap)
        assert_close(reference.decode_attention(q, k, v, lengths, 0.3, softcap), expected, FP32_TOL)
    idx = torch.randint(0, tmax, (batch, kv_heads, 7), generator=gen, device=DEVICE)
    k_out, v_out = reference.gather_kv(k, v, idx)
    for b in range(batch):
        for h in range(kv_heads):
            assert torch.equal(k_out[b, h], k[b, h, idx[b, h]]) and torch.equal(v_out[b, h], v[b, h, idx[b, h]])


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("per_head", [False, True])
def test_masked_decode_matches_naive_over_the_visible_keys(gen, groups, per_head):
    """The ragged-batch decode path: any visibility pattern (padding in the middle, per-KV-head sets)."""
    batch, kv_heads, tmax, dim = 3, 2, 11, 8
    q = randn(gen, batch, kv_heads * groups, dim)
    k, v = randn(gen, batch, kv_heads, tmax, dim), randn(gen, batch, kv_heads, tmax, dim)
    visible = torch.rand(batch, kv_heads if per_head else 1, tmax, generator=gen, device=DEVICE) > 0.4
    visible[..., -1] = True  # the token being decoded is always visible
    for softcap in (None, 2.5):
        got = reference.masked_decode_attention(q, k, v, visible, 0.3, softcap)
        for b in range(batch):
            for h in range(kv_heads * groups):
                keep = visible[b, h // groups if per_head else 0]
                lengths = torch.tensor([[int(keep.sum())]], device=DEVICE)
                want = naive_decode(
                    q[b : b + 1, h : h + 1],
                    k[b : b + 1, h // groups : h // groups + 1, keep],
                    v[b : b + 1, h // groups : h // groups + 1, keep],
                    lengths,
                    0.3,
                    softcap,
                )
                assert_close(got[b, h], want[0, 0], FP32_TOL)


# ---------------------------------------------------------------------------------------------- window scores


def check_window(gen, groups, window, tokens, dim, dtype, softcap=None, padded=True, batch=2, kv_heads=2, **blocks):
    q = randn(gen, batch, kv_heads * groups, window, dim, dtype=dtype)
    k = randn(gen, batch, kv_heads, tokens, dim, dtype=dtype)
    valid = left_padding(gen, batch, tokens, pad_last=tokens - window // 2 - 1) if padded else None
    out = nans(batch, kv_heads, tokens)
    got = tk.window_scores(q, k, 0.35, valid, softcap, out=out, **blocks)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float32
    tol = FP32_TOL if dtype == torch.float32 else HALF_TOL[dtype]
    assert_close(got, reference.window_scores(q, k, 0.35, valid, softcap), tol)


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("window,tokens,splits", [(1, 37, 3), (5, 45, None), (19, 19, None)])
def test_window_scores_fp32(gen, groups, window, tokens, splits):
    check_window(gen, groups, window, tokens, 24, torch.float32, block_t=16, block_r=16, splits=splits)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_window_scores_fp32_default_blocks_softcap(gen, softcap):
    check_window(gen, 3, 7, 53, 32, torch.float32, softcap=softcap, padded=softcap is None, batch=3, kv_heads=1)


@pytest.mark.parametrize("groups", GROUPS)
def test_window_scores_fp16(gen, groups):
    """Half precision under the interpreter is tested in fp16 (its bf16 arithmetic is wrong); bf16 is CUDA-only."""
    check_window(gen, groups, 6, 41, 16, torch.float16, softcap=5.0, block_t=16)


def test_window_scores_strided_inputs(gen):
    """Sliced queries (the policies pass window_queries[:, :, -w:]) and transposed keys need no copy."""
    q = randn(gen, 2, 6, 9, 16)[:, :, -4:]
    k = randn(gen, 2, 31, 2, 16).transpose(1, 2)
    out = nans(2, 2, 31)
    assert_close(tk.window_scores(q, k, 0.25, out=out, block_t=16), reference.window_scores(q, k, 0.25), FP32_TOL)


# ---------------------------------------------------------------------------------------------- gather


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kept", [1, 10, 23])
def test_gather_kv(gen, dtype, kept):
    batch, kv_heads, tokens = 3, 2, 23
    k, v = randn(gen, batch, kv_heads, tokens, 20, dtype=dtype), randn(gen, batch, kv_heads, tokens, 12, dtype=dtype)
    idx = torch.rand(batch, kv_heads, tokens, generator=gen, device=DEVICE).argsort(-1)[..., :kept]  # unsorted
    k_out, v_out = nans(batch, kv_heads, kept, 20, dtype=dtype), nans(batch, kv_heads, kept, 12, dtype=dtype)
    tk.gather_kv(k, v, idx, k_out=k_out, v_out=v_out, block_k=8)
    k_ref, v_ref = reference.gather_kv(k, v, idx)
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)


def test_gather_kv_into_storage_slice(gen):
    """Writes into a slice of larger preallocated storage, leaving the rest alone; int32 indices accepted."""
    k, v = randn(gen, 2, 3, 17, 16), randn(gen, 2, 3, 17, 16)
    idx = torch.randint(0, 17, (2, 3, 5), generator=gen, device=DEVICE).to(torch.int32)
    store_k, store_v = nans(2, 3, 8, 16), nans(2, 3, 8, 16)
    tk.gather_kv(k, v, idx, k_out=store_k[:, :, :5], v_out=store_v[:, :, :5])
    k_ref, v_ref = reference.gather_kv(k, v, idx)
    assert torch.equal(store_k[:, :, :5], k_ref) and torch.equal(store_v[:, :, :5], v_ref)
    assert store_k[:, :, 5:].isnan().all() and store_v[:, :, 5:].isnan().all()
    fresh_k, fresh_v = tk.gather_kv(k, v, idx)
    assert fresh_k.is_contiguous() and torch.equal(fresh_k, k_ref) and torch.equal(fresh_v, v_ref)


# ---------------------------------------------------------------------------------------------- decode attention


def check_decode(gen, groups, tmax, dim, dtype, lengths, softcap=None, dim_v=None, **launch):
    batch, kv_heads = lengths.shape
    dim_v = dim_v or dim
    q = randn(gen, batch, kv_heads * groups, dim, dtype=dtype)
    k, v = randn(gen, batch, kv_heads, tmax, dim, dtype=dtype), randn(gen, batch, kv_heads, tmax, dim_v, dtype=dtype)
    out = nans(batch, kv_heads * groups, dim_v, dtype=dtype)
    got = tk.decode_attention(q, k, v, lengths, 0.3, softcap, out=out, **launch)
    assert got.data_ptr() == out.data_ptr()
    tol = FP32_TOL if dtype == torch.float32 else HALF_TOL[dtype]
    assert_close(got, reference.decode_attention(q, k, v, lengths, 0.3, softcap), tol)


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_attention_fp32(gen, groups, splits):
    tmax = 75
    lengths = torch.tensor([[1, 75, 17], [16, 33, 74]], device=DEVICE)  # per KV head: head-level budgets
    check_decode(gen, groups, tmax, 24, torch.float32, lengths, num_splits=splits, block_n=16)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_decode_attention_fp32_default_launch(gen, softcap):
    lengths = torch.randint(1, 91, (3, 2), generator=gen, device=DEVICE).to(torch.int32)
    lengths[0] = 90  # a per-layer budget: all heads equal
    check_decode(gen, 3, 90, 32, torch.float32, lengths, softcap=softcap, dim_v=40)


@pytest.mark.parametrize("groups", GROUPS)
def test_decode_attention_fp16(gen, groups):
    """fp16 stands in for bf16 under the interpreter."""
    lengths = torch.tensor([[3, 50], [1, 29]], device=DEVICE)
    check_decode(gen, groups, 50, 16, torch.float16, lengths, softcap=6.0, num_splits=4, block_n=16)


def test_decode_attention_strided_query(gen):
    """q as a view of a (B, 1, Hq, D) projection, k/v slices of larger storage."""
    q = randn(gen, 2, 1, 6, 16).transpose(1, 2)[:, :, 0]
    k, v = randn(gen, 2, 2, 40, 16)[:, :, :30], randn(gen, 2, 2, 40, 16)[:, :, :30]
    lengths = torch.tensor([[30, 7], [12, 1]], device=DEVICE)
    out = nans(2, 6, 16)
    tk.decode_attention(q, k, v, lengths, 0.25, out=out, num_splits=2, block_n=16)
    assert_close(out, reference.decode_attention(q, k, v, lengths, 0.25), FP32_TOL)


# ---------------------------------------------------------------------------------------------- bf16 on CUDA


@CUDA_ONLY
def test_bf16_kernels_on_cuda(gen):
    check_window(gen, 7, 8, 300, 128, torch.bfloat16, softcap=30.0)
    lengths = torch.randint(1, 1001, (2, 4), generator=gen, device=DEVICE)
    check_decode(gen, 7, 1000, 128, torch.bfloat16, lengths)
    k, v = randn(gen, 2, 4, 300, 128, dtype=torch.bfloat16), randn(gen, 2, 4, 300, 128, dtype=torch.bfloat16)
    idx = torch.randint(0, 300, (2, 4, 77), generator=gen, device=DEVICE)
    assert all(map(torch.equal, tk.gather_kv(k, v, idx), reference.gather_kv(k, v, idx)))


# ---------------------------------------------------------------------------------------------- GPU compilation

AOT_SCRIPT = r"""
import sys
from triton.backends.compiler import GPUTarget
from polykv.kernels import triton_kernels as tk

for name in tk.KERNELS:
    cc = tk.compile_kernel(name, target=GPUTarget("cuda", int(sys.argv[1]), 32))
    assert cc.asm["cubin"], name
    print(name, cc.metadata.shared)
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu(arch):
    """The interpreter never lowers the kernels: compile all five to cubin for Ampere/Hopper (bf16, D=128, G=4)
    with the launchers' block choices, in a process without TRITON_INTERPRET; shared memory must fit 99 KiB."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", AOT_SCRIPT, str(arch)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    shared = {line.split()[0]: int(line.split()[1]) for line in run.stdout.splitlines()}
    assert len(shared) == 5 and max(shared.values()) <= 99 * 1024, shared


# ---------------------------------------------------------------------------------------------- dispatcher


def test_dispatcher_honours_env(gen, monkeypatch):
    calls: list[str] = []
    real = tk.window_scores
    monkeypatch.setattr(tk, "window_scores", lambda *a, **kw: calls.append("triton") or real(*a, **kw))
    q, k = randn(gen, 1, 3, 2, 16), randn(gen, 1, 1, 9, 16)
    expected = reference.window_scores(q, k, 0.5)

    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert kernels.backend() == "torch"
    assert_close(kernels.window_scores(q, k, 0.5), expected, FP32_TOL)
    assert calls == []

    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    assert kernels.backend() == "triton"
    assert_close(kernels.window_scores(q, k, 0.5), expected, FP32_TOL)
    assert calls == ["triton"]

    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    assert kernels.backend() == ("triton" if torch.cuda.is_available() else "torch")
    monkeypatch.delenv(kernels.ENV_VAR)
    assert kernels.backend() == ("triton" if torch.cuda.is_available() else "torch")

    monkeypatch.setenv(kernels.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="POLYKV_KERNELS"):
        kernels.backend()

    if not torch.cuda.is_available():  # forcing triton on CPU without the interpreter is a clear error
        monkeypatch.setenv(kernels.ENV_VAR, "triton")
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            kernels.backend()


def test_dispatcher_routes_all_kernels(gen, monkeypatch):
    """Every public function gives the reference's answer through either backend."""
    q, k, v = randn(gen, 2, 6, 16), randn(gen, 2, 2, 21, 16), randn(gen, 2, 2, 21, 16)
    lengths, idx = torch.tensor([[21, 4], [1, 13]], device=DEVICE), torch.tensor([[[0, 20]] * 2] * 2, device=DEVICE)
    for choice in ("torch", "triton"):
        monkeypatch.setenv(kernels.ENV_VAR, choice)
        assert_close(
            kernels.decode_attention(q, k, v, lengths, 0.3), reference.decode_attention(q, k, v, lengths, 0.3), FP32_TOL
        )
        assert all(map(torch.equal, kernels.gather_kv(k, v, idx), reference.gather_kv(k, v, idx)))
