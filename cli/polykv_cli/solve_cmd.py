"""`polykv solve`: calibration curves -> one plan per average budget (or a uniform / pyramid baseline)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer
from rich import box
from rich.table import Table

from polykv_cli.common import err, fail, one_line_errors, out


def _allocation(uniform: str | None, allocation: str | None) -> tuple[str | None, str]:
    """(allocation name or None, policy) from --uniform POLICY / --allocation NAME[:POLICY]."""
    if uniform and allocation:
        fail("pass either --uniform POLICY or --allocation NAME[:POLICY], not both")
    if uniform:
        return "uniform", uniform
    if not allocation:
        return None, "snapkv"
    name, _, policy = allocation.partition(":")
    if name not in ("uniform", "pyramid"):
        fail(f"unknown --allocation {name!r}; use pyramid[:POLICY] or uniform:POLICY")
    if name == "uniform" and not policy:
        fail("--allocation uniform needs a policy, e.g. --allocation uniform:snapkv")
    return name, policy or "snapkv"


def _fmt_loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _bits(bits: int) -> str:
    """`/4b` below 16 bits, else nothing."""
    return "" if bits == 16 else f"/{bits}b"


def _describe(agg) -> str:
    text = "mean" if agg.statistic == "mean" else f"quantile {agg.q:g}"
    if agg.category_weights:
        text += " weighted " + ",".join(f"{c}={w:g}" for c, w in agg.category_weights)
    return text


def guard_table(plans, verdicts) -> Table:
    """One row per budget: the guard's measured answer KL of the solved plan and the best uniform policy, and what
    was written."""
    grid = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title="guard: answer KL on held-out samples, all layers compressed",
        title_justify="left",
    )
    for col in ("avg", "solved", "best uniform", "written", "KL", "wins"):
        grid.add_column(col, justify="left" if col in ("best uniform", "written") else "right", no_wrap=True)
    for plan, v in zip(plans, verdicts, strict=False):
        best = v.best_uniform
        grid.add_row(
            f"{plan.average_budget:g}",
            _fmt_loss(v.losses.get("solved")),
            "-" if best is None else f"{best.removeprefix('uniform:')} {_fmt_loss(v.losses[best])}",
            v.chosen,
            _fmt_loss(v.losses[v.chosen]),
            "-" if best is None or v.chosen == best else f"{v.wins.get(v.chosen, 0)}/{v.samples}",
        )
    return grid


def cross_check_line(plans, forced: bool | None) -> str | None:
    """One line on whether the DP and the ILP both solved the plans and agreed (None if no plan was solved)."""
    checks = {plan.average_budget: plan.provenance["cross_check"] for plan in plans if "cross_check" in plan.provenance}
    ran = {budget: check["agreed"] for budget, check in checks.items() if check["ran"]}
    bad = ", ".join(f"{budget:g}" for budget, agreed in ran.items() if not agreed)
    if not checks:
        return None
    if bad:
        return f"cross-check: the DP and the ILP DISAGREE at avg {bad}; the first solver's plan was kept; please report"
    if forced is False:
        return "cross-check: off (--no-cross-check)"
    if not ran:
        return "cross-check: skipped, the problem is too large for it to be cheap (--cross-check forces it)"
    some = "" if len(ran) == len(checks) else f" on {len(ran)} of {len(checks)} budgets (the rest too large)"
    return f"cross-check: the DP and the ILP agree{some}"


def register(app: typer.Typer) -> None:
    @app.command()
    @one_line_errors
    def solve(
        calibration: Path = typer.Option(..., "--calibration", "-c", help="Directory written by polykv calibrate."),
        budget: int | None = typer.Option(None, "--budget", "-b", help="Average tokens per layer."),
        budgets: str | None = typer.Option(None, "--budgets", help="Comma list, one plan each: 64,128,256."),
        out_path: Path | None = typer.Option(
            None,
            "--out",
            "-o",
            help="Plan file (one budget) or directory (avg<budget>.json each); default plans/<model>/.",
        ),
        metric: str | None = typer.Option(
            None,
            "--metric",
            help="Loss metric (default: the first the calibration "
            "has of e2e_kl, proxy_anchored, proxy_scaled, e2e_dnll, proxy_err).",
        ),
        aggregate: str = typer.Option("mean", "--aggregate", help="Over samples: mean | max | quantile:Q."),
        category_weights: str | None = typer.Option(None, "--category-weights", help="e.g. qa=2,code=1."),
        policies: str | None = typer.Option(None, "--policies", help="Comma list the solver may use."),
        pin: list[str] = typer.Option([], "--pin", help="LAYER:POLICY[:BUDGET] (LAYER or A-B), e.g. 0:full."),
        min_budget: list[str] = typer.Option([], "--min-budget", help="[LAYER:]N, e.g. 32 or 0-3:64."),
        max_budget: list[str] = typer.Option([], "--max-budget", help="[LAYER:]N, e.g. 512 or 5:128."),
        max_policies: int | None = typer.Option(None, "--max-policies", help="At most K distinct policies."),
        full_cost: int | None = typer.Option(None, "--full-cost", help="Tokens a full pin costs (default: grid max)."),
        allow_missing: bool = typer.Option(False, "--allow-missing", help="Aggregate incomplete calibrations."),
        solver: str = typer.Option("auto", "--solver", help="auto | dp | ilp."),
        cross_check: bool = typer.Option(
            False, "--cross-check", help="Always solve with DP and ILP and compare (default: when cheap)."
        ),
        no_cross_check: bool = typer.Option(False, "--no-cross-check", help="Never solve with both."),
        uniform: str | None = typer.Option(None, "--uniform", help="Write the uniform plan of POLICY instead."),
        target: str | None = typer.Option(
            None,
            "--target",
            help="Solve for what an engine runs natively: hf | vllm | trtllm | llamacpp (each layer full or a "
            "window; docs/export.md). Default output: a target-ENGINE folder; no guard.",
        ),
        reference_context: int | None = typer.Option(
            None,
            "--reference-context",
            help="With --target: the context length the budget is KV memory at; a full layer costs this many tokens.",
        ),
        max_windows: int = typer.Option(
            4, "--max-windows", help="With --target trtllm: at most K distinct windows (memory pools), full included."
        ),
        allocation: str | None = typer.Option(
            None, "--allocation", help="Named allocation instead of solving: pyramid[:POLICY] (default snapkv)."
        ),
        pyramid_beta: float = typer.Option(20.0, "--pyramid-beta", help="Pyramid top layer gets B/beta."),
        guard: bool = typer.Option(
            True,
            "--guard/--no-guard",
            help="Measure each plan against its blends and every uniform policy on held-out "
            "samples (loads the model) and write the best.",
        ),
        guard_data: Path | None = typer.Option(
            None,
            "--guard-data",
            help="JSONL the guard judges on, minus the calibrated samples (default: the shipped held-out set).",
        ),
        guard_samples: int = typer.Option(8, "--guard-samples", help="Held-out samples the guard judges on."),
        guard_margin: float = typer.Option(
            1.0,
            "--guard-margin",
            help="Standard errors by which another candidate must beat the solved plan to replace it.",
        ),
        guard_objective: str = typer.Option(
            "kl",
            "--guard-objective",
            help="Loss the guard judges by: kl (answer KL to the full cache) | nll (gold answer) | own-kl | "
            "own-miss (on the full cache's own greedy answer).",
        ),
        guard_model: str | None = typer.Option(
            None, "--guard-model", help="Model to load (default: the calibration's)."
        ),
    ) -> None:
        """Choose each layer's (policy, budget) to minimise predicted loss under the total KV budget."""
        from polykv.guard import GuardSettings, guard_plans
        from polykv.io import check_writable
        from polykv.solve.constraints import SolveOptions, parse_budgets, parse_layer_values, parse_pins, parse_weights
        from polykv.solve.inputs import read_metadata
        from polykv.solve.runner import SolveRequest, load_table, plan_paths, plans_for, write_plans
        from polykv.solve.summary import summarize

        if (budget is None) == (budgets is None):
            fail("pass exactly one of --budget N or --budgets LIST")
        if cross_check and no_cross_check:
            fail("pass either --cross-check or --no-cross-check, not both")
        wanted = (budget,) if budget is not None else parse_budgets(budgets or "")
        kind, policy = _allocation(uniform, allocation)
        request = SolveRequest(
            calibration,
            wanted,
            metric,
            aggregate,
            parse_weights(category_weights),
            allow_missing,
            kind,
            policy,
            pyramid_beta,
        )
        table, provenance = load_table(request)
        n = table.num_layers
        options = SolveOptions(
            policies=tuple(p.strip() for p in policies.split(",") if p.strip()) if policies else None,
            pins=parse_pins(pin, n),
            min_budget=parse_layer_values(min_budget, n, "--min-budget"),
            max_budget=parse_layer_values(max_budget, n, "--max-budget"),
            max_policies=max_policies,
            full_cost=full_cost,
            solver=solver,
            cross_check=True if cross_check else False if no_cross_check else None,
        )
        if target is not None:
            from polykv.solve.targets import Target, solve_target

            if kind is not None:
                fail("pass either --target or a baseline (--uniform / --allocation), not both")
            if reference_context is None:
                fail("--target needs --reference-context N: the context length the budget is KV memory at")
            engine = Target(target, reference_context, max_windows)
            plans = [solve_target(table, b, engine, options, provenance) for b in wanted]
            kind, policy = "target", target
            err.print("guard: not run for --target plans (its candidates are not all plans the engine runs)")
        else:
            if reference_context is not None:
                fail("--reference-context applies with --target only")
            plans = plans_for(replace(request, options=options), table, provenance)
        paths = plan_paths(table.model, wanted, out_path, kind, policy)
        verdicts = []
        if guard and kind is None:
            for path in paths:
                check_writable(path)  # before the guard's minutes of work
            if guard_margin < 0:
                fail(f"--guard-margin must be >= 0, got {guard_margin}")
            settings = GuardSettings(
                data=guard_data,
                samples=guard_samples,
                margin=guard_margin,
                objective=guard_objective,
                model=guard_model,
            )
            guarded = guard_plans(
                table,
                plans,
                options,
                provenance,
                read_metadata(calibration),
                settings,
                log=lambda m: err.print(m, highlight=False, markup=False, soft_wrap=True),
            )
            plans, verdicts = [p for p, _ in guarded], [v for _, v in guarded]
        write_plans(plans, paths)

        out.print(
            f"[bold]{table.model}[/] ({plans[0].fingerprint_hash}) · metric {table.metric} · "
            f"{_describe(table.aggregation)} · unit {plans[0].budget_unit}",
            highlight=False,
            soft_wrap=True,
        )
        grid = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for col in ("avg", "pred. loss", "best uniform", "Δ", "min/med/max", "fill", "policies"):
            wide = col in ("best uniform", "policies")
            grid.add_column(
                col,
                justify="left" if wide else "right",
                no_wrap=not wide,
                min_width=14 if col == "policies" else None,
                overflow="fold",
            )
        for plan in plans:
            s = summarize(plan, table)
            u = s.best_uniform
            grid.add_row(
                f"{s.average_budget:g}",
                _fmt_loss(s.predicted_loss),
                "-" if u is None else f"{u.policy}@{u.budget}{_bits(u.bits)} {_fmt_loss(u.loss)}",
                "-" if s.gain is None else f"{-100 * s.gain:+.1f}%",
                f"{s.budget_min}/{s.budget_median:g}/{s.budget_max}",
                f"{100 * s.used_budget / s.total_budget:.0f}%",
                " ".join(f"{p}:{c}" for p, c in s.policy_counts.items()),
            )
        out.print(grid)
        if line := cross_check_line(plans, options.cross_check):
            out.print(line, highlight=False, markup=False, soft_wrap=True)
        if verdicts:
            out.print(guard_table(plans, verdicts))
        for path in paths:
            out.print(str(path), highlight=False, markup=False, soft_wrap=True)
