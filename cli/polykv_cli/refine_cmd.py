"""`polykv refine`: solved plans -> plans refined against the model's measured whole-model loss."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.table import Table

from polykv_cli.common import err, fail, one_line_errors, out


def register(app: typer.Typer) -> None:
    @app.command()
    @one_line_errors
    def refine(
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="Alias, hub id, local dir or .gguf path."),
        plans: Path | None = typer.Option(
            None, "--plans", "-p", help="Plan file or directory (default plans/<model>/)."
        ),
        out_dir: Path = typer.Option(
            ..., "--out", "-o", help="Directory for the refined plans (avg<budget>.json each)."
        ),
        budgets: str | None = typer.Option(
            None, "--budgets", help="Only the plans at these average budgets, e.g. 128,256."
        ),
        data: Path | None = typer.Option(None, "--data", help="Calibration JSONL (default: the shipped set)."),
        samples: int = typer.Option(
            16,
            "--samples",
            "-n",
            help="Calibration samples the moves are measured on, taken round-robin across categories.",
        ),
        holdout: int | None = typer.Option(
            None,
            "--holdout",
            help="Further samples (the next round-robin ones) that only judge each round: a round is accepted only "
            "if it also lowers their loss. Default: the samples left after --samples, at most 8. 0: none.",
        ),
        rounds: int = typer.Option(8, "--rounds", help="At most this many rounds of moves per plan."),
        caution: float = typer.Option(
            1.0,
            "--caution",
            help="Rank moves by mean change + this many standard errors over the samples (0: the mean alone).",
        ),
        reach: int = typer.Option(
            1,
            "--reach",
            help="Moves per layer: its policy up to this many grid budgets up or down, other policies within one "
            "fewer (1: a budget step or another policy at the same budget).",
        ),
        start: str = typer.Option(
            "plan",
            "--start",
            help="plan: search from each plan; uniform: from the uniform policy with the lowest measured loss at "
            "its budget (each layer's options priced with the rest of the model compressed at that budget).",
        ),
        min_gain: float = typer.Option(
            0.01, "--min-gain", help="Stop when a round lowers the loss by less (relative)."
        ),
        max_context: int = typer.Option(4096, "--max-context", help="Truncate contexts (middle) to this many tokens."),
        device: str | None = typer.Option(None, "--device"),
        dtype: str | None = typer.Option(None, "--dtype"),
    ) -> None:
        """Local search on each plan: single-layer moves measured with every layer compressed, kept if they help."""
        from polykv.answer_loss import prepare_samples
        from polykv.calibrate import default_data_path, round_robin
        from polykv.calibrate.runner import budget_grid
        from polykv.data import load_samples
        from polykv.evaluate.methods import plan_files
        from polykv.models import fingerprint, load_model
        from polykv.plan import Plan
        from polykv.policies import policy_names
        from polykv.refine import best_uniform, refine_plan
        from polykv.solve.constraints import parse_budgets

        if samples < 1 or rounds < 1 or reach < 1 or (holdout or 0) < 0 or caution < 0:
            fail("--samples, --rounds and --reach must be at least 1, --holdout and --caution at least 0")
        if start not in ("plan", "uniform"):
            fail(f"--start {start!r}: use plan or uniform")
        source = plans or Path("plans") / model
        if not source.exists():
            fail(f"no plans at {source}; pass --plans with a plan file or a directory written by polykv solve")
        found = plan_files(source)
        if budgets is not None:
            wanted = set(parse_budgets(budgets))
            missing = sorted(wanted - {b for b, _ in found})
            if missing:
                fail(
                    f"no plan in {source} at average budget {', '.join(map(str, missing))}; have "
                    f"{', '.join(str(b) for b, _ in found) or 'none'}"
                )
            found = [(b, p) for b, p in found if b in wanted]
        if not found:
            fail(f"no plans with an integer average_budget in {source}")
        path = data or default_data_path()
        available = load_samples(path)
        if holdout is None:
            holdout = max(0, min(8, len(available) - samples))
        if samples + holdout > len(available):
            fail(
                f"{path} holds {len(available)} samples; --samples {samples} plus --holdout {holdout} need "
                f"{samples + holdout}: lower them or pass --data with more"
            )
        items = round_robin(available)[: samples + holdout]  # the first --samples are those calibrate takes
        loaded = load_model(model, device=device, dtype=dtype)
        fp = fingerprint(loaded.model.config)
        source_plans = [(b, Plan.load(p)) for b, p in found]
        for _, plan in source_plans:
            plan.check_model(fp)
        err.print(f"preparing {len(items)} calibration samples from {path} ({samples} to search, {holdout} held out)")
        prepared = prepare_samples(loaded, items, max_context)
        prepared, held_out = prepared[:samples], prepared[samples:]
        grid = budget_grid(max_context, None)
        policies = [p for p in policy_names() if p != "full"]
        out_dir.mkdir(parents=True, exist_ok=True)
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        columns = ["avg", "loss before", "after", "rounds"]
        columns += ["held-out before", "after"] if held_out else []
        for col in columns + ["layers changed", "seconds"]:
            table.add_column(col, justify="right")
        written = []
        for budget, plan in source_plans:
            if start == "uniform":
                plan, measured = best_uniform(loaded.model, prepared, plan, policies)
                err.print(
                    f"avg {budget}: from uniform {plan.layers[0].policy} ("
                    + ", ".join(f"{p} {v:.4f}" for p, v in sorted(measured.items(), key=lambda kv: kv[1]))
                    + ")",
                    highlight=False,
                    soft_wrap=True,
                )
            result = refine_plan(
                loaded.model,
                prepared,
                plan,
                grid,
                policies,
                rounds,
                min_gain,
                log=lambda m: err.print(m, highlight=False, soft_wrap=True),
                held_out=held_out,
                caution=caution,
                reach=reach,
            )
            target = out_dir / f"avg{budget}.json"
            result.plan.save(target)
            written.append(target)
            changed = sum(
                a.policy != b.policy or a.budget != b.budget
                for a, b in zip(plan.layers, result.plan.layers, strict=True)
            )
            row = [str(budget), f"{result.losses[0]:.4f}", f"{result.losses[-1]:.4f}", str(len(result.moves))]
            row += [f"{result.held_out[0]:.4f}", f"{result.held_out[-1]:.4f}"] if held_out else []
            table.add_row(*row, str(changed), f"{result.seconds:.0f}")
        out.print(
            f"[bold]{loaded.name}[/] · {len(prepared)} samples, {len(held_out)} held out · objective: mean "
            "KL(full || plan) on answers",
            highlight=False,
            soft_wrap=True,
        )
        out.print(table)
        for target in written:
            out.print(str(target), highlight=False, markup=False, soft_wrap=True)
