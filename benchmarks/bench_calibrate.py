"""Calibration cost per sample on the bundled SmolLM2: plain prefill vs the proxy pass vs e2e (one process).

Prints a Markdown section: machine, load, command, and per-sample seconds (median of --repeats) for
  plain prefill (DynamicCache, sdpa), prepare (capture with window queries + cumulative attention + the
  teacher-forced answer), the proxy curves + statistics, and e2e curves for --e2e-layers layers (its per-sample
  figure is that time x layers / --e2e-layers: an extrapolation, labelled as such), the reference e2e forwards of
  `--measure scaled` (2 options x every layer), plus peak RSS.
Run: python benchmarks/bench_calibrate.py [--threads 2] [--repeats 3] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--e2e-layers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from polykv.calibrate.runner import REFERENCE_OPTIONS, CalibrationConfig, calibration_options, measure_sample
    from polykv.calibrate.sample import prepare
    from polykv.calibrate.sensitivity import Option, e2e_losses
    from polykv.models import load_model
    from polykv.policies import make_policy
    from polykv.settings import LayerSetting

    lm = load_model("smollm2-135m")
    sample = json.loads(Path("calibration_data/default.jsonl").read_text().splitlines()[8])  # prose retrieval
    text = (sample["context"] + "\n\n") * 4
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    context = lm.tokenizer.decode(ids[0])
    load0 = os.getloadavg()
    rows: dict[str, list[float]] = {
        "plain prefill": [],
        "prepare": [],
        "proxy + statistics": [],
        "scaled: reference e2e (all layers)": [],
        "e2e (measured layers)": [],
    }
    refs = [Option(name, b, LayerSetting(make_policy(name), b)) for name, b in REFERENCE_OPTIONS]
    for _ in range(args.repeats):
        t = time.perf_counter()
        with torch.no_grad():
            lm.model(input_ids=ids, logits_to_keep=1)
        rows["plain prefill"].append(time.perf_counter() - t)
        t = time.perf_counter()
        prepared = prepare(lm.model, lm.tokenizer, context, sample["question"], sample["answers"][0], None, 64)
        rows["prepare"].append(time.perf_counter() - t)
        t = time.perf_counter()
        measure_sample(lm.model, prepared, CalibrationConfig(measure="proxy", max_context=None))
        rows["proxy + statistics"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for layer in range(lm.model.config.num_hidden_layers):
            e2e_losses(lm.model, prepared, layer, refs, batch=8)
        rows["scaled: reference e2e (all layers)"].append(time.perf_counter() - t)
        options = calibration_options(CalibrationConfig(max_context=None), prepared.prompt_tokens)
        t = time.perf_counter()
        for layer in range(args.e2e_layers):
            e2e_losses(lm.model, prepared, layer, options, batch=8)
        rows["e2e (measured layers)"].append(time.perf_counter() - t)
    load1 = os.getloadavg()
    layers = lm.model.config.num_hidden_layers
    med = {k: statistics.median(v) for k, v in rows.items()}
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "?",
    )
    print(f"### Calibration cost per sample (SmolLM2-135M, {prepared.prompt_tokens}-token prompt)\n")
    print(f"- machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads")
    print(f"- load average before / after: {load0[0]:.2f} / {load1[0]:.2f}")
    print(f"- command: `python {shlex.join(sys.argv)}` (median of {args.repeats})\n")
    print("| step | seconds | x plain prefill |\n|---|---|---|")
    base = med["plain prefill"]
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | {v / base:.2f} |")
    proxy_total = med["prepare"] + med["proxy + statistics"]
    e2e_total = med["prepare"] + med["e2e (measured layers)"] * layers / args.e2e_layers
    print(f"| **proxy sample total** (prepare + proxy) | {proxy_total:.2f} | {proxy_total / base:.2f} |")
    scaled_total = proxy_total + med["scaled: reference e2e (all layers)"]
    print(f"| **scaled sample total** (proxy + reference e2e) | {scaled_total:.2f} | {scaled_total / base:.2f} |")
    print(
        f"| **e2e sample total** (extrapolated from {args.e2e_layers} of {layers} layers) | {e2e_total:.1f} | "
        f"{e2e_total / base:.1f} |"
    )
    print(f"\npeak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
