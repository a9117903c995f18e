"""CLI output that people read in logs and at 80 columns: help texts and tables written into a pipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from polykv.plan import Plan
from polykv_cli.main import app

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "plans" / "smollm2-135m" / "avg128.json"


def _commands(group, prefix: tuple[str, ...] = ()):
    """(path, command) of every command and sub-command."""
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_fits_80_columns_without_cutting_anything(path, command):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.output, f"polykv {' '.join(path)} --help cuts a text short:\n{result.output}"
    flat = re.sub(r"[\s│]", "", result.output)  # wrapped lines joined
    for param in command.params:
        default = param.default
        if param.param_type_name != "option" or isinstance(default, bool) or default in (None, (), []):
            continue
        shown = str(default).replace(" ", "")
        assert f"[default:{shown}]" in flat, f"polykv {' '.join(path)} --help: default of {param.name} is cut"


def test_plan_show_into_a_pipe_keeps_every_policy_name_whole():
    """`polykv plan show X | cat`: not a terminal, so the table is as wide as its content, even under COLUMNS=80."""
    plan = Plan.load(PLAN)
    for env in ({}, {"COLUMNS": "80"}):
        result = CliRunner().invoke(app, ["plan", "show", str(PLAN)], env=env)
        assert result.exit_code == 0, result.output
        assert "…" not in result.output
        rows = [line for line in result.output.splitlines() if re.match(r"\s*\d+ │", line)]
        assert len(rows) == len(plan.layers)  # one line per layer: no cell wrapped onto a second line
        for lp, row in zip(plan.layers, rows, strict=True):
            cells = [c.strip() for c in row.split("│")]
            assert cells[0] == str(lp.layer) and cells[2] == lp.policy, row
