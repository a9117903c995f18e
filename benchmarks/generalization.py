"""The generalization benchmark: do plans hold on workloads they were not made for?

Two protocols per model and workload family (benchmarks/generalization/<family>/, built from sources that neither
the shipped suite nor the shipped calibration set uses):

- foreign: the checked-in plans (made on the shipped calibration set) against every uniform policy on the family's
  evaluation instances;
- own: `polykv calibrate --data` on the first N of the family's calibration pool (N = 8, 16, 32 by default),
  `polykv solve` (guarded on the family's held-out samples, the same 8 for every N), evaluated on the family's
  evaluation instances (disjoint from every calibration sample).

All plans are evaluated in one `polykv eval` run per model and family (one prefill per instance serves every method),
so each plan is compared with the best uniform policy on the same instances, with paired 95 % intervals.

    python benchmarks/generalization.py --model smollm2-135m --family manpages --out runs/generalization

The calibration pool is the first `--pool` samples of calibration.jsonl in round-robin order; the samples after it
judge the guard. A calibration on N samples is the first N parts of the pool's calibration (the computation is per
sample and deterministic), so the pool is calibrated once and the smaller N are copies of its first parts.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ROOT / "benchmarks" / "generalization"
sys.path.insert(0, str(ROOT / "src"))

from polykv.calibrate import round_robin  # noqa: E402
from polykv.data import load_samples  # noqa: E402


def run(cmd: list[str], log: Path) -> None:
    print(shlex.join(cmd), flush=True)
    with log.open("a") as fh:
        fh.write(shlex.join(cmd) + "\n")
        fh.flush()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=fh, stderr=subprocess.STDOUT)


def split_pool(family: Path, pool: int, out: Path) -> tuple[Path, Path]:
    """Write the calibration pool and the guard's held-out samples as two JSONL files (round-robin order)."""
    rows = {json.loads(line)["id"]: line for line in (family / "calibration.jsonl").read_text().splitlines() if line}
    ordered = [s.id for s in round_robin(load_samples(family / "calibration.jsonl"))]
    if len(ordered) <= pool:
        raise SystemExit(f"{family}/calibration.jsonl has {len(ordered)} samples; --pool {pool} leaves none to guard")
    out.mkdir(parents=True, exist_ok=True)
    pool_file, guard_file = out / "pool.jsonl", out / "guard.jsonl"
    pool_file.write_text("".join(rows[i] + "\n" for i in ordered[:pool]))
    guard_file.write_text("".join(rows[i] + "\n" for i in ordered[pool:]))
    return pool_file, guard_file


def subset_calibration(full: Path, n: int, out: Path) -> Path:
    """The calibration of the first `n` samples: the first `n` parts of `full` and its metadata, trimmed."""
    if out.exists():
        shutil.rmtree(out)
    for sub in ("curves", "statistics"):
        (out / sub).mkdir(parents=True)
        for i in range(n):
            shutil.copy2(full / sub / f"part-{i:05d}.parquet", out / sub / f"part-{i:05d}.parquet")
    for name in ("run.json", "metadata.json"):
        meta = json.loads((full / name).read_text())
        meta["sample_ids"] = meta["sample_ids"][:n]
        if "timings" in meta:
            per = meta["timings"].get("per_sample", {})
            meta["timings"]["per_sample"] = {k: per[k] for k in meta["sample_ids"] if k in per}
        (out / name).write_text(json.dumps(meta, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument(
        "--family", required=True, help="a directory name under benchmarks/generalization, or a path to one"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/generalization"))
    ap.add_argument("--budgets", default="64,128,256,512")
    ap.add_argument(
        "--own",
        default="8,16,32",
        help="calibration sample counts of the own-workload protocol (empty: foreign protocol only)",
    )
    ap.add_argument("--pool", type=int, default=32, help="calibration pool size; the rest judges the guard")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="at most N evaluation instances per task")
    args = ap.parse_args(argv)

    family = Path(args.family) if Path(args.family).is_dir() else FAMILIES / args.family
    if not (family / "eval").is_dir():
        raise SystemExit(f"no family {args.family}: {family}/eval does not exist")
    polykv = str(Path(sys.executable).with_name("polykv"))
    work = args.out / f"{args.model}-{family.name}"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    methods = ["full", "uniform:*", f"plan:plans/{args.model}"]
    counts = [int(n) for n in args.own.split(",") if n.strip()]
    if counts:
        if max(counts) > args.pool:
            raise SystemExit(f"--own {max(counts)} exceeds --pool {args.pool}")
        pool_file, guard_file = split_pool(family, args.pool, work)
        full_cal = work / f"cal-{args.pool}"
        run([polykv, "calibrate", "--model", args.model, "--data", str(pool_file), "--out", str(full_cal)], log)
        for n in counts:
            cal = full_cal if n == args.pool else subset_calibration(full_cal, n, work / f"cal-{n}")
            plans = work / f"plans-own{n}"
            run(
                [
                    polykv,
                    "solve",
                    "-c",
                    str(cal),
                    "--budgets",
                    args.budgets,
                    "--out",
                    str(plans),
                    "--guard-data",
                    str(guard_file),
                ],
                log,
            )
            methods.append(f"plan-own{n}:{plans}")
    cmd = [
        polykv,
        "eval",
        "--model",
        args.model,
        "--tasks",
        str(family / "eval"),
        "--budgets",
        args.budgets,
        "--methods",
        ",".join(methods),
        "--workers",
        str(args.workers),
        "--out",
        str(work / "eval"),
    ]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    run(cmd, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
