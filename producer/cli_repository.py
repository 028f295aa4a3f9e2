"""Model repository commands: models, promote, rollback, serve.

Registered on ``producer.cli.app`` when ``producer.cli`` imports this module. The repository
is ``--repository URI``, else the environment variable ``MODELYARD_REPOSITORY``, else
``file://./model-repo``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from producer.cli import EXIT_BAD_INPUT, EXIT_UNAVAILABLE, _fail, _guard, app, console
from shared.errors import ModelyardError, UserInputError

REPOSITORY_ENV = "MODELYARD_REPOSITORY"
DEFAULT_REPOSITORY = "file://./model-repo"
ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")

RepositoryOption = Annotated[
    str | None,
    typer.Option("--repository", "-r", help=f"Repository URI (file:// or gs://). Default: ${REPOSITORY_ENV}, "
                 f"else {DEFAULT_REPOSITORY}.", show_default=False),
]
AliasOption = Annotated[str, typer.Option("--alias", "-a", help="The alias to move.")]


def _repository_uri(option: str | None) -> str:
    return option or os.environ.get(REPOSITORY_ENV) or DEFAULT_REPOSITORY


def _open(option: str | None):
    """The repository; a file:// or plain path that does not exist is refused (not created)."""
    from shared.repository import ModelRepository

    uri = _repository_uri(option)
    if "://" not in uri or uri.startswith("file://"):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        if not Path(path).expanduser().is_dir():
            raise UserInputError(f"model repository {uri} does not exist (set --repository or ${REPOSITORY_ENV})")
        uri = Path(path).expanduser().resolve().as_uri()
    return ModelRepository.open(uri)


def _run(fn):
    """_guard, plus storage failures (unreachable bucket, lost races) as exit 3."""

    def wrapped():
        try:
            return fn()
        except UserInputError:
            raise
        except ModelyardError as exc:
            raise _fail(f"model repository: {exc}", EXIT_UNAVAILABLE) from None

    return _guard(wrapped)


def _check_alias(alias: str) -> None:
    if not ALIAS.match(alias) or alias == "latest":
        raise _fail(f"alias {alias!r} is not a valid alias name (a letter, then letters, digits, '_', '.', '-'; "
                    "not 'latest')", EXIT_BAD_INPUT)


@app.command()
def models(
    repository: RepositoryOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the repository's models with their versions and aliases."""

    def listing():
        repo = _open(repository)
        found = []
        for name in repo.models():
            aliases = {alias: entry.get("version") for alias, entry in sorted(repo.aliases(name).items())}
            found.append({"name": name, "versions": repo.versions(name), "aliases": aliases})
        return repo.uri, found

    uri, found = _run(listing)
    if as_json:
        console.print_json(json.dumps({"repository": uri, "models": found}))
        return
    if not found:
        console.print(f"no models in {uri}", highlight=False)
        return
    table = Table(title=f"models in {uri}", title_justify="left")
    table.add_column("model", style="bold")
    table.add_column("versions")
    table.add_column("latest", justify="right")
    table.add_column("aliases")
    for entry in found:
        versions = entry["versions"]
        aliases = ", ".join(f"{alias} → {version}" for alias, version in entry["aliases"].items()) or "-"
        table.add_row(entry["name"], ", ".join(map(str, versions)), str(versions[-1]) if versions else "-", aliases)
    console.print(table)


@app.command()
def promote(
    model: Annotated[str, typer.Argument(help="The model name.")],
    version: Annotated[str, typer.Argument(help="A version number, 'latest', or another alias to copy.")],
    alias: AliasOption = "production",
    repository: RepositoryOption = None,
) -> None:
    """Point an alias at a version (servers polling the alias switch to it)."""
    _check_alias(alias)

    def move():
        repo = _open(repository)
        target = repo.resolve(model, version)
        return target, repo.set_alias(model, alias, target, reason="promote")

    target, previous = _run(move)
    if previous == target:
        console.print(f"{model}: {alias} already points at version {target}", highlight=False)
    else:
        console.print(f"{model}: {alias} → version {target} (was {previous if previous is not None else 'unset'})",
                      highlight=False)


@app.command()
def rollback(
    model: Annotated[str, typer.Argument(help="The model name.")],
    alias: AliasOption = "production",
    repository: RepositoryOption = None,
) -> None:
    """Move an alias back to the version it pointed at before its last change."""
    _check_alias(alias)
    current, previous = _run(lambda: _open(repository).rollback(model, alias))
    console.print(f"{model}: {alias} rolled back to version {previous} (was {current})", highlight=False)


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="The model name.")],
    alias: Annotated[str | None, typer.Option("--alias", "-a", help="Serve the version this alias names "
                                                                     "(default production); follows it.")] = None,
    version: Annotated[int | None, typer.Option("--version", "-v", min=1, help="Serve this fixed version.")] = None,
    repository: RepositoryOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    poll_interval: Annotated[float, typer.Option(min=0.05, help="Seconds between alias checks.")] = 5.0,
    threads: Annotated[int, typer.Option(min=1, help="ONNX Runtime threads per inference.")] = 2,
    workers: Annotated[int, typer.Option(min=1, help="Inferences run at the same time.")] = 4,
    cache_dir: Annotated[Path | None, typer.Option(help="Keep downloaded versions here "
                                                        "(default: a temporary folder).")] = None,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body accepted, MiB.")] = 64,
) -> None:
    """Serve a model over HTTP (KServe v2 / Triton REST), following an alias as it moves."""
    if alias is not None and version is not None:
        raise _fail("give --alias or --version, not both", EXIT_BAD_INPUT)
    if alias is not None:
        _check_alias(alias)
    ref = str(version) if version is not None else (alias or "production")
    uri = _run(lambda: _open(repository).uri)
    console.print(f"serving {model}@{ref} from {uri} on http://{host}:{port}/v2/models/{model}", highlight=False,
                  soft_wrap=True)

    from worker import serving

    _run(lambda: serving.serve(uri, model, ref, host=host, port=port, poll_interval=poll_interval,
                               threads=threads, workers=workers, cache_dir=cache_dir,
                               max_body_bytes=int(max_body_mb * 2**20)))
