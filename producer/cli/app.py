"""The ``modelyard`` Typer app, its consoles, and how an error becomes a message and an exit code.

Every command module imports ``app`` from here and registers its commands on it; this module
imports none of them (``producer.cli`` imports them all). Exit codes, the same for every command:

====  ==========================================================================
0     done (a waited-for job SUCCEEDED)
1     the job ended FAILED or CANCELLED
2     bad input: job file, option, job id, repository, alias; nothing was changed
3     unavailable: Redis (or the model repository's storage) unreachable or lost
4     ``--timeout`` ran out while waiting; the job goes on running
130   interrupted (Ctrl-C): a followed job goes on running, a ``run`` stops
====  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from producer import api
from shared.errors import UserInputError

EXIT_JOB_FAILED, EXIT_BAD_INPUT, EXIT_UNAVAILABLE, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 3, 4, 130

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Convert, optimize and deploy trained models.")
# Not a terminal (a CI log, a pipe): a fixed width instead of rich's 80 columns.
console = Console(width=None if Console().is_terminal else 160)
err = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 160)

T = TypeVar("T")


def fail(message: str, code: int) -> typer.Exit:
    """Print ``error: message`` on stderr; the caller raises what this returns."""
    err.print(f"[red]error:[/] {escape(message)}", highlight=False)  # '[batch, 4]' in a message is not markup
    return typer.Exit(code)


def guard(fn: Callable[[], T]) -> T:
    """Run fn; the errors a user can meet become a message and their exit code, never a traceback."""
    try:
        return fn()
    except UserInputError as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from None
    except api.BrokerUnavailable as exc:
        raise fail(f"{exc}. Is Redis running? Start the local stack with 'modelyard up' "
                   "or set MODELYARD_BROKER_URL.", EXIT_UNAVAILABLE) from None


def version() -> str:
    try:
        return metadata.version("modelyard")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        console.print(f"modelyard {version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the installed version and exit.")] = False,
) -> None:
    """Convert, optimize and deploy trained models."""
