"""`polykv export PLAN --to FORMAT --out PATH`: a plan as an engine's own configuration (docs/export.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from polykv_cli.common import one_line_errors, out


def register(app: typer.Typer) -> None:
    @app.command()
    @one_line_errors
    def export(
        plan: Path = typer.Argument(..., help="A plan JSON (polykv solve --target ENGINE writes ones engines run)."),
        to: str = typer.Option(..., "--to", help="hf-config | vllm | trtllm | llamacpp."),
        out_path: Path = typer.Option(
            ..., "--out", "-o", help="Output file (trtllm: .yaml/.yml for YAML, else JSON; llamacpp: a .gguf)."
        ),
        model: str | None = typer.Option(
            None,
            "--model",
            "-m",
            help="Check the plan against this model (alias, dir, .gguf, hub id); llamacpp: the GGUF to copy "
            "(default: the plan's model).",
        ),
        max_seq_len: int | None = typer.Option(
            None, "--max-seq-len", help="trtllm: the window of full layers (default: the plan's reference context)."
        ),
    ) -> None:
        """Write what an engine needs to run a plan natively (full and sliding-window layers only)."""
        from polykv.export import ExportOptions, export_plan

        summary = export_plan(plan, to, out_path, ExportOptions(model=model, max_seq_len=max_seq_len))
        out.print(f"{to}: {summary}", highlight=False, markup=False, soft_wrap=True)
        out.print(str(out_path), highlight=False, markup=False, soft_wrap=True)
