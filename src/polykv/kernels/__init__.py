"""Kernel dispatcher: window scoring, KV compaction and decode attention (over plain or quantized KV) on Triton
(CUDA) or torch (everywhere).

`POLYKV_KERNELS` picks the backend: `auto` (default) uses Triton for CUDA tensors when triton is installed and torch
otherwise, `torch` always uses the torch reference path, `triton` forces Triton (on CPU only under the Triton
interpreter, TRITON_INTERPRET=1, which is how the kernels are tested without a GPU). `backend()` names the backend
in force; `recording()` collects what actually served each path (prefill, score, gather, chunk, decode, quantized
decode), since under `auto` a CPU tensor, a masked layer or a layer with attention sinks takes torch even where
Triton is in force.
triton is imported lazily: this package works without it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import ModuleType

import torch
from torch import Tensor

from polykv.kernels import quantized_reference, reference
from polykv.quantized_tokens import QuantizedTokens

__all__ = [
    "ENV_VAR",
    "backend",
    "decode_attention",
    "describe_ran",
    "gather_kv",
    "note",
    "quantized_decode_attention",
    "recording",
    "window_scores",
]

ENV_VAR = "POLYKV_KERNELS"
CHOICES = ("auto", "triton", "torch")

_ran: ContextVar[dict[str, set[str]] | None] = ContextVar("polykv_kernels_ran", default=None)


def note(path: str, impl: str) -> None:
    """Record that `impl` (e.g. "triton", "torch sdpa") served `path` (e.g. "decode"), inside `recording()`."""
    ran = _ran.get()
    if ran is not None:
        ran.setdefault(path, set()).add(impl)


@contextmanager
def recording() -> Iterator[dict[str, set[str]]]:
    """Collect {path: implementations that served it} for the calls made inside (paths in first-use order)."""
    ran: dict[str, set[str]] = {}
    token = _ran.set(ran)
    try:
        yield ran
    finally:
        _ran.reset(token)


def describe_ran(ran: dict[str, set[str]]) -> dict[str, str]:
    """{path: "impl" or "impl + impl"}: what a recording saw, JSON-ready (several when layers took different paths)."""
    return {path: " + ".join(sorted(impls)) for path, impls in ran.items()}


def requested() -> str:
    """The validated value of POLYKV_KERNELS (default `auto`)."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r} is not one of {', '.join(CHOICES)}")
    return choice


@functools.cache
def triton_importable() -> bool:
    """Whether triton imports (only asked when Triton would be used: with CUDA, or when forced)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend() -> str:
    """ "triton" or "torch": the backend POLYKV_KERNELS selects on this machine.

    Under `auto`, CPU tensors still take the torch path even when this says "triton" (a CUDA box running a CPU
    model). Raises RuntimeError when `triton` is forced where it cannot run.
    """
    choice = requested()
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if torch.cuda.is_available() and triton_importable() else "torch"
    if not triton_importable():
        raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed: `pip install triton` or set {ENV_VAR}=auto")
    if not torch.cuda.is_available() and not _interpreter_on():
        raise RuntimeError(
            f"{ENV_VAR}=triton needs a CUDA GPU; on CPU set TRITON_INTERPRET=1 before importing polykv "
            f"(slow, for tests) or set {ENV_VAR}=auto or torch"
        )
    return "triton"


def _triton_module() -> ModuleType:
    from polykv.kernels import triton_kernels

    return triton_kernels


def _use_triton(tensor: Tensor) -> bool:
    """Route one call: Triton for CUDA tensors (auto/triton), for CPU tensors only when forced and interpreted."""
    if backend() == "torch":
        return False
    if tensor.device.type == "cuda":
        return True
    if requested() == "auto":
        return False
    if tensor.device.type == "cpu" and _interpreter_on():
        if not _triton_module().INTERPRETED:
            raise RuntimeError(
                "polykv.kernels.triton_kernels was imported before TRITON_INTERPRET=1 was set; "
                "set it before the first import (e.g. at the top of conftest.py)"
            )
        return True
    raise RuntimeError(f"{ENV_VAR}=triton cannot run on {tensor.device.type} tensors; set {ENV_VAR}=auto")


def routes_to_triton(tensor: Tensor) -> bool:
    """Whether a call on `tensor` takes the Triton path (public form of the routing rule above)."""
    return _use_triton(tensor)


def window_scores(
    q: Tensor, k: Tensor, scaling: float, valid: Tensor | None = None, softcap: float | None = None
) -> Tensor:
    """(B, Hkv, T) fp32 attention of the window queries q (B, Hq, W, D) on keys k (B, Hkv, T, D).

    Causal softmax per window query over non-padding keys, summed over the window and the GQA group; see
    `reference.window_scores` for the exact definition. Pool afterwards if the policy needs it.
    """
    if _use_triton(k):
        note("score", "triton")
        return _triton_module().window_scores(q, k, scaling, valid, softcap)
    note("score", "torch")
    return reference.window_scores(q, k, scaling, valid, softcap)


def gather_kv(k: Tensor, v: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """(k[b, h, idx[b, h]], v[b, h, idx[b, h]]): compact a layer's cache to the kept token indices (B, Hkv, K)."""
    if _use_triton(k):
        note("gather", "triton")
        return _triton_module().gather_kv(k, v, idx)
    note("gather", "torch")
    return reference.gather_kv(k, v, idx)


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scaling: float, softcap: float | None = None
) -> Tensor:
    """(B, Hq, Dv) attention of one query per sequence over the first lengths[b, h] (>= 1) keys of each KV head."""
    if _use_triton(k):
        note("decode", "triton")
        return _triton_module().decode_attention(q, k, v, lengths, scaling, softcap)
    note("decode", "torch")
    return reference.decode_attention(q, k, v, lengths, scaling, softcap)


def _triton_quantized(tensor: Tensor) -> ModuleType:
    from polykv.kernels import triton_quantized

    if tensor.device.type == "cpu" and not triton_quantized.INTERPRETED:
        raise RuntimeError(
            "polykv.kernels.triton_quantized was imported before TRITON_INTERPRET=1 was set; "
            "set it before the first import (e.g. at the top of conftest.py)"
        )
    return triton_quantized


def quantized_decode_attention(
    q: Tensor, store: QuantizedTokens, scaling: float, mask: Tensor | None = None, lengths: Tensor | None = None
) -> Tensor:
    """(B, Hq, 1, Dv) attention of one query per head q (B, Hq, 1, D) over the tokens of a quantized store.

    On Triton the codes are unpacked and dequantized in the kernel's loads; `quantized_reference` defines the result
    (an additive or boolean `mask` (B, 1 | Hkv | Hq, 1, N), or valid `lengths` (B,) / (B, Hkv)). A 16-bit store
    holds plain tensors and always takes torch.
    """
    if store.bits >= 16 or not _use_triton(q):
        note("quantized decode", "torch")
        return quantized_reference.quantized_decode_attention(q, store, scaling, mask, lengths)
    note("quantized decode", "triton")
    return _triton_quantized(q).quantized_decode_attention(q, store, scaling, mask, lengths)
