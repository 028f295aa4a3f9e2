"""gs:// client settings: the project defaults to the credentials' own, and an empty emulator host is no emulator."""

from __future__ import annotations

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from shared.settings import Settings, get_settings
from shared.storage import gcs


class FakeClient:
    """Records how GCSStore built its client; answers get_bucket."""

    made: list[dict] = []

    def __init__(self, **kwargs) -> None:
        FakeClient.made.append(kwargs)

    def get_bucket(self, name: str) -> str:
        return f"bucket {name}"


@pytest.fixture
def fake_client(monkeypatch):
    FakeClient.made = []
    monkeypatch.setattr(gcs.storage, "Client", FakeClient)
    get_settings.cache_clear()
    yield FakeClient.made
    get_settings.cache_clear()


@pytest.mark.parametrize("value, expected", [(None, {}), ("", {}), ("billing-project", {"project": "billing-project"})])
def test_the_project_is_the_credentials_own_unless_one_is_set(fake_client, monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("MODELYARD_GCS_PROJECT", raising=False)
    else:
        monkeypatch.setenv("MODELYARD_GCS_PROJECT", value)
    gcs.GCSStore("gs://bucket/prefix")
    # No project argument at all: storage.Client then asks google.auth.default() for the project
    # (project=None would mean "no project").
    assert fake_client == [expected]


def test_the_default_project_is_not_a_made_up_name(monkeypatch):
    monkeypatch.delenv("MODELYARD_GCS_PROJECT", raising=False)
    assert Settings().gcs_project is None


def test_an_empty_emulator_host_uses_the_real_service(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "")
    real = storage.Client(project="p", credentials=AnonymousCredentials())
    assert real._connection.API_BASE_URL == "https://storage.googleapis.com"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://gcs:9023")
    assert storage.Client()._connection.API_BASE_URL == "http://gcs:9023"
