"""`polykv eval` in one process vs `--workers N`: wall clock and whether the predictions are identical.

Runs the default comparison (full, every uniform policy, pyramid, the checked-in plans; budgets 64-512) on
`--limit` instances per shipped task, once per worker count, each in a fresh process, and prints a Markdown section
with the machine, its load, the commands and the seconds. Run:
    python benchmarks/bench_eval_workers.py [--workers 1,2] [--limit 1] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare, the first is the reference")
    ap.add_argument("--limit", type=int, default=1, help="instances per task")
    ap.add_argument("--threads", type=int, default=2, help="threads of the eval process (split between workers)")
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    polykv = str(Path(sys.executable).with_name("polykv"))
    print(f"## eval workers, {args.model}, {args.limit} instance(s) per task\n")
    print(f"- load before: {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, {args.threads} threads\n")
    print("| workers | wall s | prefill + compress s (summed) | decode s (summed) | identical predictions | command |")
    print("|---|---|---|---|---|---|")
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(w) for w in args.workers.split(",")]:
            out = Path(tmp) / f"w{n}"
            opts = ["--model", args.model, "--limit", str(args.limit), "--workers", str(n)]
            opts += ["--dtype", args.dtype] if args.dtype else []
            cmd = [polykv, "eval", *opts, "--out", str(out)]
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            sec = json.loads((out / "info.json").read_text())["seconds"]
            preds = pd.read_parquet(out / "results.parquet").prediction.tolist()
            reference = reference if reference is not None else preds
            same = sum(a == b for a, b in zip(reference, preds, strict=True))
            shown = shlex.join(["polykv", "eval", *opts, "--out", "DIR"])
            print(
                f"| {n} | {wall:.1f} | {sec['prefill_and_compress']} | {sec['decode']} | {same}/{len(reference)} | "
                f"`{shown}` |"
            )
    print(f"\n- load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
