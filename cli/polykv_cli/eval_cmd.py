"""`polykv eval` and `polykv report`."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from polykv_cli.common import err, fail, one_line_errors, out

DEFAULT_METHODS = "full,uniform:*,pyramid,plan"


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        )
    except (OSError, StopIteration):
        pass
    import torch

    threads = torch.get_num_threads()
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads)"


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @one_line_errors
    def eval_(
        model: str = typer.Option("smollm2-135m", "--model", "-m"),
        tasks: Path | None = typer.Option(None, "--tasks", help="A task JSONL file or a directory of them."),
        dataset: str | None = typer.Option(None, "--dataset", help="LongBench-format HF dataset NAME[:CONFIG]."),
        budgets: str = typer.Option("64,128,256,512", "--budgets", help="Comma list of average budgets."),
        methods: str = typer.Option(
            DEFAULT_METHODS,
            "--methods",
            help="Comma list of: full, quant:BITS (8, 4, 2: the whole context quantised), hf-quant:BITS (4, 2: "
            "the same with transformers' QuantizedCache; needs polykv[quant-anchor]), uniform:POLICY, uniform:* "
            "(every policy), pyramid, plan[:PATH], plan-NAME:PATH.",
        ),
        mode: str = typer.Option("query-aware", "--mode", help="query-aware | context-only"),
        limit: int | None = typer.Option(None, "--limit", help="At most N instances per task."),
        max_context: int = typer.Option(4096, "--max-context"),
        out_dir: Path = typer.Option(..., "--out", "-o"),
        calibration: Path | None = typer.Option(None, "--calibration", help="Calibration dir for the heatmap."),
        verify_prefill: int = typer.Option(
            0, "--verify-prefill", help="Also re-run K instances with one prefill per method: equality and speed-up."
        ),
        max_rows: int = typer.Option(64, "--max-rows", help="Compressed caches decoded together."),
        workers: int = typer.Option(
            1,
            "--workers",
            help="Worker processes sharing the instances (each loads the "
            "model; this process's threads are split between them).",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
        device: str | None = typer.Option(None, "--device"),
        dtype: str | None = typer.Option(None, "--dtype"),
    ) -> None:
        """Full cache vs every uniform policy vs PyramidKV vs the plan, on long-context tasks; gap recovery."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        from polykv.errors import InputError
        from polykv.evaluate.methods import parse_methods, require_backends
        from polykv.evaluate.progress import clear_progress, load_progress, save_progress
        from polykv.evaluate.report import render
        from polykv.evaluate.suite import load_default_suite, suite_files
        from polykv.evaluate.tasks import load_tasks
        from polykv.evaluate.workers import EvalJob, run_instances
        from polykv.io import atomic_write, atomic_write_json
        from polykv.prompts import MODES
        from polykv.solve.constraints import parse_budgets

        if workers < 1:
            fail(f"--workers {workers} must be at least 1")
        if mode not in MODES:
            fail(f"unknown --mode {mode!r}; use {' or '.join(MODES)}")
        grid = list(parse_budgets(budgets))
        if tasks is not None and dataset is not None:
            fail("pass either --tasks or --dataset, not both")
        if dataset is not None:
            from polykv.data import load_hf_dataset
            from polykv.evaluate.tasks import TaskInstance

            instances = [
                TaskInstance(s.id, s.category, s.context, s.question, s.answers, "f1") for s in load_hf_dataset(dataset)
            ]
        elif tasks is not None:
            files = suite_files(tasks) if tasks.is_dir() else [tasks]
            instances = []
            for f in files:
                got, warnings = load_tasks(f)
                for w in warnings:
                    err.print(f"[yellow]{w}[/]", highlight=False, soft_wrap=True)
                instances.extend(got)
        else:
            instances = load_default_suite()
        if limit is not None:
            per_task: dict[str, int] = {}
            kept = []
            for inst in instances:
                per_task[inst.task] = per_task.get(inst.task, 0) + 1
                if per_task[inst.task] <= limit:
                    kept.append(inst)
            instances = kept
        default_plans = Path("plans") / model
        if "plan" in methods.split(",") and not default_plans.exists():
            err.print(f"[yellow]no checked-in plans in {default_plans}: evaluating without a plan[/]")
            methods = ",".join(m for m in methods.split(",") if m != "plan")
        method_list = parse_methods(methods, default_plans)
        require_backends(method_list)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            fail(f"cannot create --out {out_dir} ({exc.strerror}); choose a writable directory")
        run_key = {
            "model": model,
            "methods": ",".join(m.spec for m in method_list),
            "budgets": grid,
            "mode": mode,
            "max_context": max_context,
            "instances": [f"{i.task}/{i.id}" for i in instances],
        }
        try:
            done_rows, done = load_progress(out_dir, run_key)
        except InputError as exc:
            fail(str(exc))
        if done:
            err.print(
                f"resuming {out_dir}: {len(done)} of {len(instances)} instances already evaluated", soft_wrap=True
            )
        job = EvalJob(model, tuple(method_list), tuple(grid), mode, max_context, max_rows, device, dtype)
        pending = [i for i in instances if (i.task, i.id) not in done]
        verify = {(i.task, i.id) for i in instances[:verify_prefill]}
        rows, prefill_s, decode_s, checks = list(done_rows), 0.0, 0.0, []
        started = time.perf_counter()
        with Progress(
            TextColumn("[bold]eval"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
        ) as progress:
            task = progress.add_task("instances", total=len(instances), completed=len(done))
            for fin in run_instances(job, pending, verify, workers):
                rows.extend(fin.result.rows)
                prefill_s += fin.result.prefill_s
                decode_s += fin.result.decode_s
                if fin.check:
                    checks.append(fin.check)
                save_progress(out_dir, run_key, rows)
                progress.advance(task)
        position = {(i.task, i.id): k for k, i in enumerate(instances)}  # workers finish out of order
        rows.sort(key=lambda r: position[(str(r["task"]), str(r["instance_id"]))])
        results = pd.DataFrame(rows)
        atomic_write(
            out_dir / "results.parquet",
            lambda tmp: pq.write_table(pa.Table.from_pandas(results, preserve_index=False), tmp),
        )
        plan_method = next((m for m in method_list if m.kind == "plan"), None)
        info = {
            "model": model,
            "command": shlex.join(["polykv"] + sys.argv[1:]),
            "machine": _machine(),
            "mode": mode,
            "instances": len(instances),
            "tasks": sorted({i.task for i in instances}),
            "max_context": max_context,
            "seconds": {
                "total": round(time.perf_counter() - started, 1),
                "prefill_and_compress": round(prefill_s, 1),
                "decode": round(decode_s, 1),
            },
            "workers": workers,
            "plans": {str(b): p for b, p in (plan_method.plans if plan_method else ())},
            "calibration": str(calibration) if calibration else None,
            "methods": run_key["methods"],
            "budgets": grid,
            "verify_prefill": checks,
        }
        if done:
            info["resumed_instances"] = len(done)
        atomic_write_json(out_dir / "info.json", info)
        clear_progress(out_dir)
        summ = render(out_dir)
        if checks:
            same = sum(c["same_predictions"] for c in checks)
            total = sum(c["configurations"] for c in checks)
            speed = sum(c["reprefill_s"] for c in checks) / max(sum(c["engine_s"] for c in checks), 1e-9)
            err.print(f"prefill-per-method check: {same}/{total} identical predictions; engine {speed:.1f}x faster")
        if as_json:
            sys.stdout.write(json.dumps(summ) + "\n")
            return
        out.print((out_dir / "report.md").read_text(), markup=False, highlight=False, soft_wrap=True)

    @app.command()
    @one_line_errors
    def report(
        out_dir: Path = typer.Argument(..., help="An evaluation directory (polykv eval --out)."),
        tasks: str | None = typer.Option(
            None, "--tasks", help="Only these tasks (comma list): writes report-<tasks>.md and summary-<tasks>.json."
        ),
        calibration: Path | None = typer.Option(
            None,
            "--calibration",
            help="Use this calibration for the heatmap and the predicted-loss check (recorded in info.json).",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
    ) -> None:
        """Re-render report.md, summary.json and the plots of an evaluation directory (or a task subset's report)."""
        from polykv.evaluate.report import render

        if not (out_dir / "results.parquet").exists():
            fail(f"{out_dir} has no results.parquet; run polykv eval --out {out_dir} first")
        subset = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
        summ = render(out_dir, subset, calibration)
        if as_json:
            sys.stdout.write(json.dumps(summ) + "\n")
            return
        name = "report.md" if not subset else f"report-{'+'.join(sorted(subset))}.md"
        out.print(f"wrote {out_dir / name}")
