"""`polykv run` and `polykv models`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from polykv_cli.common import err, fail, one_line_errors, out


def _parse_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        if "=" not in item:
            fail(f"--param {item!r} must look like key=value, e.g. --param window=32")
        key, value = item.split("=", 1)
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def register(app: typer.Typer) -> None:
    @app.command()
    @one_line_errors
    def run(
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="Alias, hub id, local dir or .gguf path."),
        plan: Path | None = typer.Option(
            None, "--plan", help="A plan JSON (polykv solve) or a list of {policy, budget}."
        ),
        policy: str | None = typer.Option(None, "--policy", help="One policy for every layer (with --budget)."),
        budget: int | None = typer.Option(None, "--budget", help="Tokens kept per layer with --policy."),
        param: list[str] = typer.Option([], "--param", help="Policy parameter key=value (with --policy)."),
        prompt: str | None = typer.Option(None, "--prompt", help="The context text."),
        prompt_file: Path | None = typer.Option(
            None, "--prompt-file", help="Read the context from a file ('-' = stdin)."
        ),
        question: str | None = typer.Option(None, "--question", help="A question appended after the context."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
        mode: str = typer.Option("query-aware", "--mode", help="query-aware | context-only"),
        max_context: int | None = typer.Option(None, "--max-context", help="Truncate the context (middle) to fit."),
        device: str | None = typer.Option(None, "--device"),
        dtype: str | None = typer.Option(None, "--dtype"),
        device_map: str | None = typer.Option(None, "--device-map", help="e.g. auto (accelerate) for big models."),
        attn: str = typer.Option("sdpa", "--attn", help="sdpa | eager"),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    ) -> None:
        """Generate with a compressed KV cache and report what it kept."""
        from polykv.apply import resolve_settings
        from polykv.models import load_model
        from polykv.run import run as run_prompt

        if plan is not None and policy is not None:
            fail("pass either --plan or --policy/--budget, not both")
        if policy is not None and budget is None and policy != "full":
            fail(f"--policy {policy} needs --budget N (tokens kept per layer)")
        if (prompt is None) == (prompt_file is None):
            fail("pass exactly one of --prompt TEXT or --prompt-file FILE")
        if prompt_file is not None:
            import sys

            context = sys.stdin.read() if str(prompt_file) == "-" else prompt_file.read_text()
        else:
            context = prompt or ""
        if plan is not None and not plan.exists():
            fail(f"plan file {plan} does not exist; create one with polykv solve or pass --policy/--budget")
        loaded = load_model(model, device=device, dtype=dtype, attn_implementation=attn, device_map=device_map)
        from polykv.settings import uniform

        n = loaded.model.config.get_text_config(decoder=True).num_hidden_layers
        if plan is not None:
            settings = resolve_settings(loaded.model, plan)
        else:
            settings = uniform(policy or "full", budget or 1, n, _parse_params(param))
        result = run_prompt(loaded, settings, context, question, max_new_tokens, mode, max_context)
        if as_json:
            out.print_json(json.dumps(result.to_dict()))
            return
        out.print(result.text, highlight=False, markup=False)
        table = Table(title=f"{loaded.name}: KV cache per layer", show_lines=False)
        for col in ("layer", "policy", "budget", "kept", "full"):
            table.add_column(col, justify="right" if col != "policy" else "left")
        for i, (s, k, f) in enumerate(zip(result.layers, result.kept_tokens, result.full_tokens, strict=True)):
            table.add_row(str(i), s["policy"], str(s["budget"]), str(k), str(f))
        err.print(table)
        mb = 1 / 2**20
        err.print(
            f"KV bytes: {result.kv_bytes * mb:.2f} MiB kept of {result.kv_bytes_full * mb:.2f} MiB full "
            f"({100 * result.kv_bytes / max(result.kv_bytes_full, 1):.1f}%), index {result.index_bytes * mb:.3f} MiB | "
            f"prompt {result.prompt_tokens} tok | prefill {result.prefill_s:.2f} s | decode {result.decode_s:.2f} s "
            f"for {result.new_tokens} tok | kernels: {', '.join(f'{k} {v}' for k, v in result.kernels.items())} | "
            f"mode: {result.mode}"
        )

    @app.command()
    @one_line_errors
    def models() -> None:
        """List model aliases and whether they can be loaded here."""
        from polykv.models import ALIASES, DEFAULT_MODEL, alias_state, cache_root

        table = Table(title=f"models (cache: {cache_root()})")
        for col in ("alias", "source", "state", "description"):
            table.add_column(col)
        for spec in ALIASES.values():
            name = spec.alias + (" (default)" if spec.alias == DEFAULT_MODEL else "")
            table.add_row(name, spec.hub_id or ", ".join(spec.packages), alias_state(spec), spec.description)
        out.print(table)
