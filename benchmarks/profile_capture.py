"""Where an eval instance's prefill time goes: plain prefill vs the engine's capture, with and without H2O's
cumulative attention, and a torch profile of the capture (BENCHMARKS.md, "Speed, re-measured").

    python benchmarks/profile_capture.py --task passkey --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from polykv.capture import capture
from polykv.models import load_model
from polykv.prompts import encode

SUITE = Path(__file__).resolve().parents[1] / "src" / "polykv" / "evaluate" / "suite" / "data"


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the model's default dtype)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype)
    row = json.loads((SUITE / f"{args.task}.jsonl").read_text().splitlines()[0])
    ids = encode(loaded.tokenizer, row["context"], row["question"]).ids
    model = loaded.model
    print(
        f"{args.model}, {row['id']}: {ids.shape[1]} prompt tokens, {args.threads} threads, {model.dtype}, best of "
        f"{args.repeats}"
    )
    with torch.no_grad():
        model(input_ids=ids[:, :256], use_cache=True, logits_to_keep=1)  # warm-up: first-call allocations
        plain = best_of(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), args.repeats)
        bare = best_of(lambda: capture(model, ids, cumulative=False), args.repeats)
        full = best_of(lambda: capture(model, ids, cumulative=True), args.repeats)
        print(f"plain prefill {plain:.2f} s | capture {bare:.2f} s | capture with cumulative attention {full:.2f} s")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            capture(model, ids, cumulative=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
