"""GPU benchmark of the PolyKV Triton kernels against the torch path (`make bench-gpu`).

Times window scoring, KV compaction and decode attention on a CUDA device for the Triton kernels and the torch
reference, checks they agree, and reports achieved memory bandwidth against the device's measured copy bandwidth
(the roofline that matters for decode attention, which is memory-bound). Prints a Markdown table on stdout.
Without a CUDA device (or without triton) it prints one line to stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    kernel: str
    shape: str
    torch_ms: float
    triton_ms: float
    bytes_moved: int
    max_err: float


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "bench-gpu: TRITON_INTERPRET=1 is set; unset it, the interpreter cannot be benchmarked"
    if not torch.cuda.is_available():
        return "bench-gpu: no CUDA GPU available (torch.cuda.is_available() is False); run it on a machine with one"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "bench-gpu: triton is not installed; `pip install -e '.[triton]'`"
    return None


def cuda_time_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median wall time of fn on the current stream, measured with CUDA events per repetition."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def copy_bandwidth(device: torch.device, gib: float, warmup: int, reps: int) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), the practical DRAM roofline."""
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup, reps)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def max_err(a: torch.Tensor | tuple[torch.Tensor, ...], b: torch.Tensor | tuple[torch.Tensor, ...]) -> float:
    pairs = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
    return max((x.float() - y.float()).abs().max().item() for x, y in pairs)


def measure(kernel: str, shape: str, nbytes: int, ref: Callable, tri: Callable, warmup: int, reps: int) -> Row:
    err = max_err(tri(), ref())
    return Row(kernel, shape, cuda_time_ms(ref, warmup, reps), cuda_time_ms(tri, warmup, reps), nbytes, err)


def run(args: argparse.Namespace, device: torch.device) -> list[Row]:
    from polykv.kernels import reference
    from polykv.kernels import triton_kernels as tk

    dtype, elt = DTYPES[args.dtype], DTYPES[args.dtype].itemsize
    hkv, groups, dim = args.kv_heads, args.groups, args.head_dim
    hq, scaling = hkv * groups, dim**-0.5
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    bench = dict(warmup=args.warmup, reps=args.reps)
    rows: list[Row] = []
    for batch, tokens in args.prefill:
        q, k, v = randn(batch, hq, args.window, dim), randn(batch, hkv, tokens, dim), randn(batch, hkv, tokens, dim)
        valid = torch.ones(batch, tokens, dtype=torch.bool, device=device)
        shape = f"B={batch} T={tokens} W={args.window}"
        rows.append(
            measure(
                "window_scores",
                shape,
                2 * k.numel() * elt + q.numel() * elt + batch * hkv * tokens * 4,
                partial(reference.window_scores, q, k, scaling, valid),
                partial(tk.window_scores, q, k, scaling, valid),
                **bench,
            )
        )
        kept = min(args.budget, tokens)
        idx = torch.rand(batch, hkv, tokens, generator=gen, device=device).argsort(-1)[..., :kept].sort(-1).values
        rows.append(
            measure(
                "gather_kv",
                f"B={batch} T={tokens} K={kept}",
                2 * 2 * batch * hkv * kept * dim * elt + idx.numel() * 8,
                partial(reference.gather_kv, k, v, idx),
                partial(tk.gather_kv, k, v, idx),
                **bench,
            )
        )
    for batch, length in args.decode:
        k, v = randn(batch, hkv, length, dim), randn(batch, hkv, length, dim)
        q = randn(batch, hq, dim)
        for label, lengths in (
            ("per-layer", torch.full((batch, hkv), length, device=device)),
            ("per-head", torch.randint(length // 4, length + 1, (batch, hkv), generator=gen, device=device)),
        ):
            nbytes = 2 * int(lengths.sum()) * dim * elt + 2 * q.numel() * elt
            rows.append(
                measure(
                    f"decode_attention ({label})",
                    f"B={batch} Tmax={length}",
                    nbytes,
                    partial(reference.decode_attention, q, k, v, lengths, scaling),
                    partial(tk.decode_attention, q, k, v, lengths, scaling),
                    **bench,
                )
            )
    return rows


def table(rows: list[Row], copy_gbs: float) -> str:
    lines = [
        "| kernel | shape | torch ms | triton ms | speedup | triton GB/s | % of copy BW | max abs err |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        gbs = r.bytes_moved / (r.triton_ms * 1e-3) / 1e9
        lines.append(
            f"| {r.kernel} | {r.shape} | {r.torch_ms:.3f} | {r.triton_ms:.3f} | {r.torch_ms / r.triton_ms:.2f}x "
            f"| {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | {r.max_err:.2e} |"
        )
    return "\n".join(lines)


def pairs(text: str) -> list[tuple[int, int]]:
    """'1x32768,8x4096' -> [(1, 32768), (8, 4096)]: batch x tokens."""
    return [tuple(int(n) for n in item.split("x")) for item in text.split(",") if item]  # type: ignore[misc]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=4, help="GQA group: query heads per KV head")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=32, help="observation window queries for window_scores")
    p.add_argument("--budget", type=int, default=4096, help="kept tokens per KV head for gather_kv")
    p.add_argument("--prefill", type=pairs, default=pairs("1x32768,4x8192"), help="BxT list for scoring/gather")
    p.add_argument("--decode", type=pairs, default=pairs("1x32768,8x4096,32x1024"), help="BxTmax list for decode")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--copy-gib", type=float, default=1.0, help="buffer size for the copy-bandwidth reference")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    reason = no_gpu_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # the torch path stays exact fp32 for fp32 runs
    copy_gbs = copy_bandwidth(device, args.copy_gib, args.warmup, args.reps)
    rows = run(args, device)
    props = torch.cuda.get_device_properties(device)
    print(f"# PolyKV kernels on {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}\n")
    print(
        f"dtype {args.dtype}, Hkv={args.kv_heads}, G={args.groups}, D={args.head_dim}; "
        f"measured device copy bandwidth {copy_gbs:.0f} GB/s (read + write)\n"
    )
    print(table(rows, copy_gbs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
