"""Time `polykv solve` on synthetic calibration curves and print a Markdown table (for BENCHMARKS.md).

Targets: < 1 s for 32 layers x 8 policies x 16 budgets, < 5 s for 80 layers x 12 policies x 32 budgets.
Each case times aggregation of the tidy curves (in memory, no Parquet I/O), the DP solve, the ILP solve and the whole
`aggregate + solve_plan` path, as the median of a few runs.

    python benchmarks/bench_solve.py [--samples 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from functools import partial

import numpy as np
import pandas as pd
import scipy

from polykv.plan import fingerprint_hash
from polykv.solve import SolveOptions, aggregate, solve_plan

CASES = ((32, 8, 16, 128), (80, 12, 32, 256))  # layers, policies, budgets, average budget


def synthetic_curves(
    layers: int, policies: int, budgets: int, samples: int, seed: int = 0
) -> tuple[pd.DataFrame, dict]:
    """Tidy curves with loss = scale x difficulty x exp(-budget / tau), on a grid of multiples of 32 tokens."""
    rng = np.random.default_rng(seed)
    fp = {
        "model_type": "bench",
        "num_layers": layers,
        "num_kv_heads": [8] * layers,
        "head_dim": [128] * layers,
        "layer_types": ["full_attention"] * layers,
        "sliding_window": None,
    }
    grid = 32 * np.arange(1, budgets + 1)
    names = [f"p{i}" for i in range(policies)]
    scale = rng.uniform(0.1, 2.0, (layers, policies, 1, 1))
    tau = rng.uniform(32, 512, (layers, policies, 1, 1))
    difficulty = rng.uniform(0.5, 1.5, (1, 1, 1, samples))
    values = scale * difficulty * np.exp(-grid[None, None, :, None] / tau)  # (L, P, B, S)
    lay, p, b, s = np.meshgrid(
        np.arange(layers), np.arange(policies), np.arange(budgets), np.arange(samples), indexing="ij"
    )
    df = pd.DataFrame(
        {
            "model": "bench/model",
            "fingerprint": fingerprint_hash(fp),
            "sample_id": np.array([f"s{i}" for i in range(samples)])[s.ravel()],
            "category": np.array(["qa", "code"])[s.ravel() % 2],
            "layer": lay.ravel().astype(np.int32),
            "head": pd.array([pd.NA] * values.size, dtype="Int32"),
            "policy": np.array(names)[p.ravel()],
            "budget": grid[b.ravel()].astype(np.int32),
            "metric": "proxy_err",
            "value": values.ravel(),
        }
    )
    return df, fp


def aggregate_and_solve(curves, fp, avg):
    """The whole path of `polykv solve` after reading the curves."""
    return solve_plan(aggregate(curves, fp, "bench/model"), avg)


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    cpu = platform.processor() or platform.machine()
    print(
        f"Machine: {platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPUs; "
        f"Python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"pandas {pd.__version__}\n"
    )
    print(
        f"Command: `python {' '.join(['benchmarks/bench_solve.py', *sys.argv[1:]])}` "
        f"({args.samples} samples, median of {args.repeat})\n"
    )
    print(
        "| layers x policies x budgets | avg budget | curve rows | aggregate | DP solve | ILP solve | "
        "aggregate + DP | target |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (layers, policies, budgets, avg), target in zip(CASES, ("< 1 s", "< 5 s"), strict=True):
        curves, fp = synthetic_curves(layers, policies, budgets, args.samples)
        t_agg, table = timed(partial(aggregate, curves, fp, "bench/model"), args.repeat)
        t_dp, dp = timed(partial(solve_plan, table, avg, SolveOptions(solver="dp", cross_check=False)), args.repeat)
        t_ilp, ilp = timed(partial(solve_plan, table, avg, SolveOptions(solver="ilp", cross_check=False)), args.repeat)
        t_all, _ = timed(partial(aggregate_and_solve, curves, fp, avg), args.repeat)
        if abs(dp.predicted_loss - ilp.predicted_loss) > 1e-9 * max(1.0, abs(dp.predicted_loss)):
            raise SystemExit(f"DP and ILP disagree: {dp.predicted_loss} vs {ilp.predicted_loss}")
        print(
            f"| {layers} x {policies} x {budgets} | {avg} | {len(curves):,} | {t_agg:.3f} s | {t_dp:.3f} s | "
            f"{t_ilp:.3f} s | {t_all:.3f} s | {target} |"
        )


if __name__ == "__main__":
    main()
