"""Shared CLI plumbing: one-line errors on stderr (exit 2), consoles for stdout/stderr."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape

from polykv.errors import PolyKVError

#: The least width of output that goes to a file or a pipe (`polykv eval ... | tee log`, `polykv plan show X | cat`):
#: rich would lay tables out for 80 columns (or $COLUMNS) and cut or wrap cells mid-word (a policy name, a path);
#: a log has no width, so it gets lines as long as the content needs, up to this.
PIPE_WIDTH = 240


class CliConsole(Console):
    """A rich Console that uses the terminal's width on a terminal and at least `PIPE_WIDTH` columns elsewhere.

    Decided at each print from the stream it writes to then (so a test runner's captured stdout counts as a pipe).
    """

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        isatty = getattr(self.file, "isatty", None)
        if isatty is not None and isatty():
            return size
        return ConsoleDimensions(max(size.width, PIPE_WIDTH), size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


out = CliConsole()
err = CliConsole(stderr=True)
F = TypeVar("F", bound=Callable)


def fail(message: str, code: int = 2) -> None:
    """Print `message` as is (a `[name]` in it is text, not rich markup) and exit with `code`."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
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
