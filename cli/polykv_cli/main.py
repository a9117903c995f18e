"""The `polykv` command: a thin Typer front over the library (the library never imports this package)."""

from __future__ import annotations

import typer

from polykv_cli import calibrate_cmd, eval_cmd, export_cmd, plan_cmd, refine_cmd, run_cmd, solve_cmd

app = typer.Typer(
    name="polykv",
    help="Per-layer KV-cache compression: calibrate -> solve -> run / eval / export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for module in (run_cmd, calibrate_cmd, solve_cmd, refine_cmd, plan_cmd, eval_cmd, export_cmd):
    module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
