"""The model behind the HTTP app: the version its ref serves, any other version on demand, metadata.

:class:`ModelServer` puts the parts together (a :class:`~serving.versions.VersionCache`, the
:class:`~serving.alias.AliasFollower` that keeps it serving ``model@ref``, and the record of
failed loads) and answers the questions a request asks: which loaded version serves it, and
what the model looks like.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from serving.alias import AliasFollower
from serving.devices import Device
from serving.errors import RequestError
from serving.protocol import tensor_metadata
from serving.versions import LoadedVersion, LoadFailures, VersionCache
from shared.errors import UserInputError
from shared.repository import ModelRepository
from shared.storage.base import safe_relative


class ModelServer:
    """One model of a repository, served at ``ref`` (an alias or a fixed version number)."""

    def __init__(self, repository_uri: str, model: str, ref: str = "production", *, poll_interval: float = 5.0,
                 cache_dir: Path | str | None = None, threads: int = 2, extra_versions: int = 1,
                 device: Device | None = None, max_batch_size: int | None = None,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if poll_interval <= 0:
            raise UserInputError(f"poll interval must be positive, not {poll_interval}")
        if max_batch_size is not None and max_batch_size < 1:
            raise UserInputError(f"max batch size must be at least 1, not {max_batch_size}")
        safe_relative(model)  # the model name becomes a folder of the cache
        self.repository = ModelRepository.open(repository_uri)
        self.model = model
        self.ref = str(ref)
        self.device = device or Device(requested="cpu", providers=("CPUExecutionProvider",))
        self.failures = LoadFailures(base_delay=float(poll_interval))
        self.versions = VersionCache(self.repository, model, cache_dir, extra_versions=extra_versions,
                                     threads=threads, device=self.device, max_batch_size=max_batch_size,
                                     on_batch=on_batch)
        self.alias = AliasFollower(self.repository, model, self.ref, self.versions, self.failures,
                                   poll_interval=float(poll_interval))

    @property
    def current(self) -> LoadedVersion | None:
        """The version the ref serves now."""
        return self.versions.served

    @property
    def cache_dir(self) -> Path:
        return self.versions.folder

    def start(self) -> None:
        """Load the version the ref names now; UserInputError if it does not exist or load."""
        self.alias.start()

    def poll_once(self) -> bool:
        return self.alias.poll_once()

    def close(self) -> None:
        self.alias.stop()
        self.versions.close()

    def check_name(self, name: str) -> None:
        if name != self.model:
            raise RequestError(f"unknown model {name!r}: this server serves {self.model!r}", 404)

    def version(self, version: int | None) -> LoadedVersion:
        """The served version (None), or another one, loaded on demand. RequestError if unknown.

        Loading another version can take long: call this for one off the event loop.
        """
        if version is None:
            served = self.versions.served
            if served is None:
                error = self.alias.last_error["error"] if self.alias.last_error else "no version loaded"
                raise RequestError(f"model {self.model!r} is not ready: {error}", 503)
            return served
        loaded = self.versions.get(version)
        if loaded is not None:
            return loaded
        failed = self.failures.recent(version)
        if failed is not None:
            raise RequestError(f"model {self.model!r} version {version} cannot be loaded: {failed}", 503)
        try:
            self.repository.manifest(self.model, version)
        except UserInputError:
            raise RequestError(f"model {self.model!r} has no version {version}", 404) from None
        try:
            loaded = self.versions.load(version)
        except Exception as exc:  # any load failure is this version's, not the server's
            message = self.failures.remember(version, exc)
            raise RequestError(f"model {self.model!r} version {version} cannot be loaded: {message}", 503) from None
        self.versions.keep(loaded)
        return loaded

    def metadata(self, loaded: LoadedVersion) -> dict:
        """The protocol's model metadata for ``loaded``, with modelyard's fields after it."""
        served = self.versions.served
        return {
            "name": self.model,
            "versions": [str(v) for v in (self.alias.available or [loaded.version])],
            "platform": loaded.platform,
            "inputs": tensor_metadata(loaded.session.inputs),
            "outputs": tensor_metadata(loaded.session.outputs),
            # modelyard's own fields: which version the ref serves, and the last failed swap.
            "version": str(loaded.version),
            "ref": self.ref,
            "max_batch_size": loaded.max_batch_size,
            "provider": loaded.session.provider,
            "device": self.device.report(),
            "served_by": loaded.manifest.get("served_by"),
            "serving_version": str(served.version) if served else None,
            "served": served is not None and served.version == loaded.version,
            "repository": self.repository.uri,
            "last_poll": self.alias.last_poll,
            "last_error": self.alias.last_error,
        }
