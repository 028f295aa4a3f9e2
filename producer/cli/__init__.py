"""The ``modelyard`` command line (the console script ``modelyard = "producer.cli:main"``).

``producer.cli.app`` holds the Typer app, the consoles and the exit codes; each command group
is a module that imports it and registers its commands. Importing this package imports the
groups, in the order their commands are listed in ``modelyard --help``.
"""

from __future__ import annotations

from producer.cli import gc, jobs, operations, plugins, repository, stack  # noqa: F401  (register their commands)
from producer.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    app()
