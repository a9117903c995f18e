"""Shared CLI plumbing: one-line errors on stderr (exit 2), consoles for stdout/stderr."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import typer
from rich.console import Console

from polykv.errors import PolyKVError

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def one_line_errors(fn: F) -> F:
    """Turn PolyKV's errors (and bad files) into one red line and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PolyKVError as exc:
            fail(str(exc))
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            fail(f"{exc.strerror}: {exc.filename}")
        except KeyboardInterrupt:
            err.print("interrupted")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
