"""The repository commands: models, promote, rollback, serve (argument handling)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from producer.cli import app
from shared.repository import ModelRepository

IO = {
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}],
}


def publish(repo: ModelRepository, tmp: Path, name: str) -> int:
    version = repo.claim_version(name, {})
    path = tmp / f"{name}-{version}.onnx"
    path.write_bytes(b"not run by these tests")
    repo.publish(name, version, {"model.onnx": path}, {"model_file": "model.onnx", **IO})
    return version


@pytest.fixture
def repo(tmp_path, monkeypatch) -> ModelRepository:
    monkeypatch.delenv("MODELYARD_REPOSITORY", raising=False)
    repository = ModelRepository.open((tmp_path / "repo").as_uri())
    for _ in range(3):
        publish(repository, tmp_path, "m")
    publish(repository, tmp_path, "other")
    repository.set_alias("m", "production", 1)
    repository.set_alias("m", "canary", 3)
    return repository


def run(*args: str):
    return CliRunner().invoke(app, list(args), terminal_width=200)


def test_models_lists_versions_and_aliases(repo):
    result = run("models", "--repository", repo.uri)
    assert result.exit_code == 0, result.output
    assert "1, 2, 3" in result.output and "production → 1" in result.output and "canary → 3" in result.output
    assert "other" in result.output

    listing = json.loads(run("models", "-r", repo.uri, "--json").output)
    assert listing["models"] == [
        {"name": "m", "versions": [1, 2, 3], "aliases": {"canary": 3, "production": 1}},
        {"name": "other", "versions": [1], "aliases": {}},
    ]


def test_the_repository_defaults_to_the_environment(repo, monkeypatch, tmp_path):
    monkeypatch.setenv("MODELYARD_REPOSITORY", repo.uri)
    result = run("models", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["repository"] == repo.uri
    monkeypatch.delenv("MODELYARD_REPOSITORY")
    monkeypatch.chdir(tmp_path)  # no ./model-repo here
    result = run("models")
    assert result.exit_code == 2 and "model-repo does not exist" in result.output
    assert not (tmp_path / "model-repo").exists()  # listing does not create it


def test_promote_then_rollback_round_trip(repo):
    result = run("promote", "m", "2", "--alias", "production", "--repository", repo.uri)
    assert result.exit_code == 0, result.output
    assert "production → version 2 (was 1)" in result.output
    assert repo.resolve("m", "production") == 2
    assert run("promote", "m", "canary", "-r", repo.uri).exit_code == 0  # another alias's version
    assert repo.resolve("m", "production") == 3

    result = run("rollback", "m", "--alias", "production", "--repository", repo.uri)
    assert result.exit_code == 0, result.output
    assert "rolled back to version 2 (was 3)" in result.output
    assert run("rollback", "m", "-r", repo.uri).exit_code == 0
    assert repo.resolve("m", "production") == 1
    history = repo.aliases("m")["production"]["history"]
    assert [h["to"] for h in history] == [1, 2, 3, 2, 1]


@pytest.mark.parametrize("args, message", [
    (("promote", "m", "9"), "has no version 9"),
    (("promote", "nope", "1"), "no version 1"),
    (("promote", "m", "staging"), "has no alias 'staging'"),
    (("promote", "m", "2", "--alias", "latest"), "not a valid alias name"),
    (("promote", "m", "2", "--alias", "7"), "not a valid alias name"),
    (("rollback", "m", "--alias", "canary"), "no earlier version"),
    (("rollback", "m", "--alias", "staging"), "no alias 'staging' to roll back"),
    (("serve", "m", "--alias", "staging"), "has no alias 'staging'"),
    (("serve", "m", "--alias", "canary", "--version", "2"), "not both"),
])
def test_user_errors_exit_2_with_a_message(repo, args, message):
    result = run(*args, "--repository", repo.uri)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert repo.resolve("m", "production") == 1


def test_serve_passes_its_options_to_the_server(repo, monkeypatch):
    import serving

    calls = []
    monkeypatch.setattr(serving, "serve", lambda *args, **kwargs: calls.append((args, kwargs)))
    result = run("serve", "m", "--version", "2", "-r", repo.uri, "--port", "9123", "--poll-interval", "0.5")
    assert result.exit_code == 0, result.output
    (args, kwargs), = calls
    assert args == (repo.uri, "m", "2") and kwargs["port"] == 9123 and kwargs["poll_interval"] == 0.5
    assert kwargs["host"] == "127.0.0.1" and kwargs["max_body_bytes"] == 64 * 2**20
    assert run("serve", "m", "-r", repo.uri).exit_code == 0
    assert calls[-1][0] == (repo.uri, "m", "production")


def test_the_commands_show_in_help():
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "producer", "--help"], cwd=root, capture_output=True, text=True,
                            timeout=60, env={"COLUMNS": "120", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    for command in ("models", "promote", "rollback", "serve"):
        assert f" {command} " in result.stdout
