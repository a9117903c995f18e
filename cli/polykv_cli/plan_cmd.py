"""`polykv plan validate|show|diff`: check, display and compare plan files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from polykv_cli.common import err, one_line_errors, out

POLICY_COLORS = {
    "full": "white",
    "streaming": "cyan",
    "snapkv": "green",
    "h2o": "magenta",
    "tova": "yellow",
    "knorm": "blue",
    "random": "red",
    "expected_attention": "bright_green",
    "snapkv_forward": "green4",
    "window": "grey62",
}
SPARE_COLORS = ("bright_cyan", "bright_magenta", "bright_yellow", "bright_blue", "bright_red", "orange3")


def policy_color(policy: str) -> str:
    """A fixed colour per policy (unknown names get a stable spare colour)."""
    if policy in POLICY_COLORS:
        return POLICY_COLORS[policy]
    return SPARE_COLORS[int(hashlib.sha256(policy.encode()).hexdigest(), 16) % len(SPARE_COLORS)]


def _loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _option(policy: str, budget: int, bits: int) -> str:
    """`snapkv@64`, or `snapkv@64/4b` below 16 bits."""
    return f"{policy}@{budget}" + ("" if bits == 16 else f"/{bits}b")


def guard_line(g: dict) -> str:
    """What the guard of `polykv solve` measured: answer KL of the solved plan, the best uniform policy, and what
    was written."""
    best = g.get("best_uniform")
    text = (
        f"guard ({g.get('samples')} held-out samples, answer KL with all layers compressed): solved "
        f"{_loss(g.get('solved_loss'))}"
    )
    if best:
        text += f", best uniform {best.removeprefix('uniform:')} {_loss(g.get('best_uniform_loss'))}"
    return text + f"; written: {g.get('chosen')} {_loss(g.get('chosen_loss'))}"


def register(app: typer.Typer) -> None:
    plan_app = typer.Typer(help="Validate, show and compare plan files.", no_args_is_help=True)
    app.add_typer(plan_app, name="plan")

    @plan_app.command("validate")
    def validate(paths: list[Path] = typer.Argument(..., help="Plan files to check.")) -> None:
        """Check plans against the schema, the policy registry and their budget; exit 2 if any fails."""
        from polykv.errors import PolyKVError
        from polykv.plan import Plan

        failed = 0
        for path in paths:
            try:
                plan = Plan.load(path)
            except PolyKVError as exc:
                failed += 1
                err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
                continue
            out.print(
                f"[green]ok[/] {path}: {plan.model} ({plan.fingerprint_hash}), {len(plan.layers)} layers, "
                f"average {plan.average_budget:g}, {plan.used_budget}/{plan.total_budget} {plan.budget_unit}",
                highlight=False,
                soft_wrap=True,
            )
        if failed:
            raise typer.Exit(2)

    @plan_app.command("show")
    @one_line_errors
    def show(
        path: Path = typer.Argument(..., help="Plan file."),
        width: int = typer.Option(32, "--width", help="Width of the longest budget bar."),
    ) -> None:
        """Per-layer table: policy, budget (with a bar coloured by policy), bits (when a layer is below 16) and
        predicted loss."""
        from polykv.plan import Plan, describe_fingerprint

        plan = Plan.load(path)
        prov = plan.provenance
        fp_text = describe_fingerprint(plan.fingerprint)
        out.print(
            f"[bold]{plan.model}[/] · fingerprint {plan.fingerprint_hash} ({fp_text})", highlight=False, soft_wrap=True
        )
        out.print(
            f"average budget {plan.average_budget:g} tokens · used {plan.used_budget}/{plan.total_budget} "
            f"{plan.budget_unit} · predicted loss {_loss(plan.predicted_loss)} · solver {prov.get('solver')} · "
            f"polykv {prov.get('polykv_version')}",
            highlight=False,
            soft_wrap=True,
        )
        if "refine" in prov:
            measured = prov["refine"].get("measured_loss") or []
            held = prov["refine"].get("held_out") or {}
            rounds = prov["refine"].get("rounds")
            if measured:
                text = (
                    f"refined (polykv refine): measured KL {measured[0]:.4g} -> {measured[-1]:.4g} in "
                    f"{rounds} rounds on {prov['refine'].get('samples')} samples"
                )
                if held.get("loss"):
                    text += (
                        f"; held-out KL {held['loss'][0]:.4g} -> {held['loss'][-1]:.4g} on "
                        f"{held.get('samples')} samples ({len(held.get('rejected') or [])} finalists turned down)"
                    )
                out.print(text, highlight=False, soft_wrap=True)
        if "guard" in prov:
            out.print(guard_line(prov["guard"]), highlight=False, soft_wrap=True)
        top = max(lp.budget for lp in plan.layers)
        types = plan.fingerprint["layer_types"]
        with_bits = any(lp.bits != 16 for lp in plan.layers)
        table = Table(show_edge=False, pad_edge=False)
        for col, justify in (
            ("layer", "right"),
            ("type", "left"),
            ("policy", "left"),
            ("budget", "right"),
            *((("bits", "right"),) if with_bits else ()),
            ("", "left"),
            ("pred. loss", "right"),
            ("params", "left"),
        ):
            table.add_column(col, justify=justify)
        for lp in plan.layers:
            color = policy_color(lp.policy)
            bar = Text("█" * max(1, round(width * lp.budget / top)), style=color)
            params = ", ".join(f"{k}={v}" for k, v in sorted(lp.params.items()))
            table.add_row(
                str(lp.layer),
                types[lp.layer].replace("_attention", ""),
                Text(lp.policy, style=color),
                str(lp.budget),
                *((str(lp.bits),) if with_bits else ()),
                bar,
                _loss(lp.predicted_loss),
                params,
            )
        out.print(table)

    @plan_app.command("diff")
    @one_line_errors
    def diff(
        a: Path = typer.Argument(..., help="First plan."),
        b: Path = typer.Argument(..., help="Second plan."),
    ) -> None:
        """Layers whose policy, budget, bits or params differ, and the totals; exit 0 if same, 1 if different."""
        from polykv.plan import Plan

        pa, pb = Plan.load(a), Plan.load(b)
        same = True
        if pa.fingerprint_hash != pb.fingerprint_hash:
            out.print(
                f"[yellow]different models:[/] {pa.model} ({pa.fingerprint_hash}) vs {pb.model} "
                f"({pb.fingerprint_hash})",
                highlight=False,
                soft_wrap=True,
            )
            same = False
        summary = Table(show_edge=False, pad_edge=False)
        for col in ("", str(a), str(b)):
            summary.add_column(col)
        rows = [
            ("average budget", f"{pa.average_budget:g}", f"{pb.average_budget:g}"),
            (
                "used/total",
                f"{pa.used_budget}/{pa.total_budget} {pa.budget_unit}",
                f"{pb.used_budget}/{pb.total_budget} {pb.budget_unit}",
            ),
            ("predicted loss", _loss(pa.predicted_loss), _loss(pb.predicted_loss)),
            ("solver", str(pa.provenance.get("solver")), str(pb.provenance.get("solver"))),
        ]
        for row in rows:
            summary.add_row(*row, style=None if row[1] == row[2] else "yellow")
        out.print(summary)
        layers = Table(title="layers that differ", title_justify="left", show_edge=False, pad_edge=False)
        for col in ("layer", "a", "b", "Δ budget", "Δ loss"):
            layers.add_column(col, justify="right" if col in ("layer", "Δ budget", "Δ loss") else "left")
        for la, lb in zip(pa.layers, pb.layers, strict=False):
            if (la.policy, la.budget, la.bits, la.params) == (lb.policy, lb.budget, lb.bits, lb.params):
                continue
            delta = (
                "-"
                if la.predicted_loss is None or lb.predicted_loss is None
                else f"{lb.predicted_loss - la.predicted_loss:+.4g}"
            )
            layers.add_row(
                str(la.layer),
                Text(_option(la.policy, la.budget, la.bits), style=policy_color(la.policy)),
                Text(_option(lb.policy, lb.budget, lb.bits), style=policy_color(lb.policy)),
                f"{lb.budget - la.budget:+d}",
                delta,
            )
        if len(pa.layers) != len(pb.layers):
            out.print(f"[yellow]layer counts differ:[/] {len(pa.layers)} vs {len(pb.layers)}")
            same = False
        if layers.row_count:
            out.print(layers)
            same = False
        else:
            out.print("no layer differs")
        if any(r[1] != r[2] for r in rows):
            same = False
        raise typer.Exit(0 if same else 1)
