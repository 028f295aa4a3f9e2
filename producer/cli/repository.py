"""Model repository commands: models, promote, rollback, serve, triton-sync.

Registered on the ``modelyard`` app when ``producer.cli`` imports this module. The repository
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
from rich.markup import escape
from rich.table import Table

from producer.cli.app import EXIT_BAD_INPUT, EXIT_UNAVAILABLE, app, console, err, fail, guard
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
    """guard, plus storage failures (unreachable bucket, lost races) as exit 3."""

    def wrapped():
        try:
            return fn()
        except UserInputError:
            raise
        except ModelyardError as exc:
            raise fail(f"model repository: {exc}", EXIT_UNAVAILABLE) from None

    return guard(wrapped)


def _check_alias(alias: str) -> None:
    if not ALIAS.match(alias) or alias == "latest":
        raise fail(f"alias {alias!r} is not a valid alias name (a letter, then letters, digits, '_', '.', '-'; "
                    "not 'latest')", EXIT_BAD_INPUT)


def _print_triton(repository: str | None, model: str) -> None:
    """What the rewritten config.pbtxt makes Triton load (the alias move already rewrote it)."""
    plan = _run(lambda: _open(repository).served_plan(model))
    if plan is None:
        return
    left_out = "".join(f"; {alias} → {plan.aliases[alias]} left to modelyard serve ({reason})"
                       for alias, reason in sorted(plan.left_out.items()))
    console.print(f"{model}: Triton loads version(s) {', '.join(map(str, plan.versions))}{left_out}",
                  highlight=False, soft_wrap=True)


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
    _print_triton(repository, model)
    _follow_on_vertex(repository, model, alias, target, previous)


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
    _print_triton(repository, model)
    _follow_on_vertex(repository, model, alias, previous, current)


def _follow_on_vertex(repository: str | None, model: str, alias: str, version: int, before: int | None) -> None:
    """After the repository's alias moved: move the Vertex AI alias and traffic of a version a job
    deployed there (shared.vertex_release.follow_alias); nothing for one that was not."""
    from shared.settings import get_settings
    from shared.vertex_release import follow_alias

    try:
        moved = follow_alias(_open(repository), model, alias, version, settings=get_settings(), previous=before)
    except ModelyardError as exc:
        code = EXIT_BAD_INPUT if isinstance(exc, UserInputError) else EXIT_UNAVAILABLE
        raise fail(f"{model}: {alias} moved in the repository, not on Vertex AI: {exc}. Run 'modelyard promote "
                   f"{model} {version} --alias {alias}' to try Vertex AI again.", code) from None
    if moved is None:
        return
    if "warning" in moved:
        err.print(f"[yellow]warning:[/] {escape(moved['warning'])}", highlight=False)
        return
    traffic = f", endpoint {moved['endpoint']}: 100% of traffic" if moved.get("traffic") else ""
    console.print(f"{model}: Vertex AI {moved['alias'] or 'alias unchanged'} → {moved['model']}{traffic}",
                  highlight=False, soft_wrap=True)


@app.command()
def serve(
    model: Annotated[str | None, typer.Argument(help="The model name (--vertex: optional, AIP_STORAGE_URI's "
                                                     "model).", show_default=False)] = None,
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
    device: Annotated[str, typer.Option(help="cpu, cuda or tensorrt: ONNX Runtime's providers, tried at start; "
                                             "one that does not load falls back (tensorrt → cuda → cpu), "
                                             "reported at start.")] = "cpu",
    strict_device: Annotated[bool, typer.Option(help="Refuse to start when --device falls back.")] = False,
    token_file: Annotated[Path | None, typer.Option(help="Require 'Authorization: Bearer <the file's content>' "
                                                         "on every route but the health probes. Default: "
                                                         "$MODELYARD_SERVE_TOKEN, else no token.")] = None,
    max_batch_size: Annotated[int | None, typer.Option(min=1, help="Most rows per request for a batched model "
                                                                    "(default: the version's Triton config, "
                                                                    "64).")] = None,
    vertex: Annotated[bool, typer.Option("--vertex", help="Serve as a Vertex AI custom container: the model in "
                                         "AIP_STORAGE_URI on 0.0.0.0:AIP_HTTP_PORT, AIP_HEALTH_ROUTE and "
                                         "AIP_PREDICT_ROUTE ({\"instances\"}); on by itself when AIP_MODE=PREDICTION "
                                         "or AIP_HTTP_PORT is set.")] = False,
) -> None:
    """Serve a model over HTTP (KServe v2 / Triton REST), following an alias as it moves."""
    if alias is not None and version is not None:
        raise fail("give --alias or --version, not both", EXIT_BAD_INPUT)
    if alias is not None:
        _check_alias(alias)
    from serving.vertex import vertex_requested

    if vertex or vertex_requested():
        _serve_vertex(model, str(version) if version is not None else alias, threads=threads, workers=workers,
                      cache_dir=cache_dir, max_body_bytes=int(max_body_mb * 2**20), device=device,
                      strict_device=strict_device, token_file=token_file, max_batch_size=max_batch_size)
        return
    if model is None:
        raise fail("give the model to serve: modelyard serve MODEL (or --vertex inside Vertex AI)", EXIT_BAD_INPUT)
    ref = str(version) if version is not None else (alias or "production")

    import serving
    from serving.auth import load_token
    from serving.devices import DEVICES

    if device not in DEVICES:
        raise fail(f"--device {device!r} is not one of {', '.join(DEVICES)}", EXIT_BAD_INPUT)
    uri = _run(lambda: _open(repository).uri)

    token = _run(lambda: load_token(token_file))
    console.print(f"serving {model}@{ref} from {uri} on http://{host}:{port}/v2/models/{model}"
                  f"{' (bearer token required)' if token else ''}", highlight=False, soft_wrap=True)
    _run(lambda: serving.serve(uri, model, ref, host=host, port=port, poll_interval=poll_interval,
                               threads=threads, workers=workers, cache_dir=cache_dir,
                               max_body_bytes=int(max_body_mb * 2**20), device=device,
                               strict_device=strict_device, token=token, max_batch_size=max_batch_size))


def _serve_vertex(model: str | None, ref: str | None, *, token_file: Path | None, max_body_bytes: int,
                  **options) -> None:
    """``serve --vertex``: serving.vertex with the AIP_* environment, under Vertex AI's 1.5 MB body limit."""
    from serving.auth import load_token
    from serving.vertex import VERTEX_MAX_REQUEST_BYTES, VertexEnvironment, serve_vertex

    environment = _run(VertexEnvironment.from_env)
    token = _run(lambda: load_token(token_file))
    console.print(f"serving {environment.storage_uri or '(AIP_STORAGE_URI unset)'} for Vertex AI on "
                  f"0.0.0.0:{environment.port}: health {environment.health_route}, predict "
                  f"{environment.predict_route}", highlight=False, soft_wrap=True)
    _run(lambda: serve_vertex(model=model, ref=ref, token=token,
                              max_body_bytes=min(max_body_bytes, VERTEX_MAX_REQUEST_BYTES), **options))


@app.command("triton-sync")
def triton_sync(
    target: Annotated[Path, typer.Argument(help="The local folder Triton reads (--model-repository).")],
    repository: RepositoryOption = None,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Only this model (repeatable; "
                                                                          "default: every model).")] = None,
    interval: Annotated[float, typer.Option(min=1, help="Seconds between syncs.")] = 30.0,
    once: Annotated[bool, typer.Option("--once", help="Sync once and exit (an init container).")] = False,
) -> None:
    """Keep a local copy of the repository for Triton: the aliased versions, then their config.pbtxt."""
    from serving.triton_sync import sync_forever, sync_once

    repo = _run(lambda: _open(repository))
    if once:
        listed = _run(lambda: sync_once(repo, target, model or None))
        for name, versions in listed.items():
            console.print(f"{name}: versions {', '.join(map(str, versions))} in {target}", highlight=False)
        return
    console.print(f"syncing {repo.uri} into {target} every {interval:g} s", highlight=False)
    sync_forever(repo, target, interval=interval, models=model or None)
