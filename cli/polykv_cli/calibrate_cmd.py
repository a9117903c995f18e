"""`polykv calibrate`."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from polykv_cli.common import err, fail, one_line_errors, out


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def register(app: typer.Typer) -> None:
    @app.command()
    @one_line_errors
    def calibrate(
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="Alias, hub id, local dir or .gguf path."),
        data: Path | None = typer.Option(None, "--data", help="JSONL of {id, category, context, question, answers}."),
        dataset: str | None = typer.Option(None, "--dataset", help="A LongBench-format HF dataset NAME[:CONFIG]."),
        samples: int | None = typer.Option(
            None, "--samples", "-n", help="Use N samples, taken round-robin across categories."
        ),
        policies: str | None = typer.Option(None, "--policies", help="Comma list (default: all registered)."),
        budgets: str | None = typer.Option(
            None, "--budgets", help="Comma list (default: 16, 32, ... up to the context)."
        ),
        measure: str = typer.Option(
            "scaled",
            "--measure",
            help="scaled (default: proxy curves, each layer scaled by e2e KL at 2 reference options) | proxy | e2e "
            "| both",
        ),
        max_context: int = typer.Option(4096, "--max-context", help="Truncate contexts (middle) to this many tokens."),
        e2e_batch: int = typer.Option(8, "--e2e-batch", help="Options per batched forward in e2e mode."),
        bits: str = typer.Option(
            "16", "--bits", help="KV precisions to measure each option at, e.g. 16,8,4,2 (16: the model's dtype)."
        ),
        out_dir: Path = typer.Option(..., "--out", "-o", help="Output directory (resumed if it holds the same run)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different calibration in --out."),
        device: str | None = typer.Option(None, "--device"),
        dtype: str | None = typer.Option(None, "--dtype"),
        device_map: str | None = typer.Option(None, "--device-map", help="e.g. auto (accelerate) for big models."),
    ) -> None:
        """Measure per-layer attention statistics and sensitivity curves into a Parquet directory."""
        from polykv.calibrate import CalibrationConfig, default_data_path, finish, select_samples
        from polykv.calibrate import calibrate as run_calibration
        from polykv.calibrate.summary import best_policies, read_curves
        from polykv.data import data_hash, load_hf_dataset, load_samples
        from polykv.distributed import Dist
        from polykv.models import load_model
        from polykv.policies import policy_names
        from polykv.solve.constraints import parse_budgets

        if data is not None and dataset is not None:
            fail("pass either --data or --dataset, not both")
        if dataset is not None:
            items = load_hf_dataset(dataset)
        else:
            path = data or default_data_path()
            if data is None and not path.exists():
                fail(f"no --data given and the shipped set {path} is missing; pass --data FILE.jsonl")
            items = load_samples(path)
        if samples is not None:
            if samples < 1:
                fail("--samples must be at least 1")
            items = select_samples(items, samples)
        grid = parse_budgets(budgets) if budgets is not None else None
        widths = _csv(bits) or []
        if not all(w.isdigit() for w in widths):
            fail(f"--bits must be a comma list of 16, 8, 4 or 2, got {bits!r}")
        config = CalibrationConfig(
            policies=tuple(_csv(policies) or policy_names()),
            budgets=grid,
            measure=measure,
            max_context=max_context,
            e2e_batch=e2e_batch,
            bits=tuple(sorted(map(int, widths), reverse=True)),
        )
        config.check()
        with Dist.from_env() as dist:
            loaded = load_model(model, device=device or dist.device(), dtype=dtype, device_map=device_map)
            progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=err,
                disable=dist.rank != 0 and not os.environ.get("POLYKV_ALL_RANKS"),
            )
            with progress:
                task_s = progress.add_task("samples", total=len(range(dist.rank, len(items), dist.world)))
                task_c = progress.add_task("configurations", total=None)

                def on_sample(index: int, configs: int) -> None:
                    progress.advance(task_s, 1)
                    if configs:
                        progress.update(task_c, total=(progress.tasks[1].total or 0) + configs)

                meta = run_calibration(
                    loaded,
                    items,
                    config,
                    out_dir,
                    data_hash(items),
                    overwrite=overwrite,
                    on_sample=on_sample,
                    on_progress=lambda n: progress.advance(task_c, n),
                    rank=dist.rank,
                    world=dist.world,
                    sync=dist.gather_objects,
                )
            timings = dist.gather_objects(meta["timings"]["per_sample"])
            if dist.rank != 0:
                return
            meta = finish(out_dir, meta, timings)
        curves = read_curves(out_dir)
        metric = "proxy_err" if "proxy_err" in set(curves.metric) else "e2e_kl"
        # the metric's own grid (reference rows of --measure scaled sit at budgets outside it)
        grid_all = sorted(curves[curves.metric == metric].budget.dropna().unique().tolist())
        show = [b for b in (64, 256, 1024) if b in grid_all] or grid_all[:3]
        table = Table(title=f"best policy per layer (mean {metric}, lower is better)")
        table.add_column("layer", justify="right")
        for b in show:
            table.add_column(f"budget {b}")
        for layer, row in best_policies(curves, show, metric).iterrows():
            table.add_row(str(layer), *[str(row.get(b, "")) for b in show])
        out.print(table)
        total = sum(
            t.get("prefill_s", 0) + t.get("proxy", 0) + t.get("e2e", 0) + t.get("statistics", 0)
            for t in meta["timings"]["per_sample"].values()
        )
        out.print(f"wrote {out_dir} ({len(items)} samples, {len(curves)} curve rows, {total:.0f} s of compute)")
