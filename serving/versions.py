"""The versions of one model that the server has loaded, and the folder they are downloaded to.

:class:`VersionCache` holds the served version and a small LRU of others (``extra_versions``:
the version served before a swap goes there too, so rolling an alias back is instant). Each
version is downloaded into ``<cache>/<model>/<version>/`` and opened with
:func:`shared.inference.runtime.load_session`; many threads asking for the same version at
once load it once. :class:`LoadFailures` remembers versions that failed to load so that
neither the poller nor a stream of requests downloads a broken version again at once.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serving.devices import Device
from serving.errors import RequestError
from serving.generation import GenerationEngine
from serving.protocol import check_batch, encode_response, parse_request, split_body
from shared.errors import ModelyardError, UserInputError
from shared.inference.generation import GENERATION_TASK
from shared.repository import ModelRepository
from shared.storage.base import safe_relative
from shared.triton import TritonConfig

if TYPE_CHECKING:
    from shared.inference.runtime import Session

PLATFORMS = {".onnx": "onnxruntime_onnx", ".tflite": "tflite"}  # model file suffix -> Triton platform


@dataclass
class LoadedVersion:
    """One version of the model, open and ready to run.

    ``max_batch_size`` (0: no cap, the model has no batch axis) is checked on a request's
    declared shapes before any tensor is decoded; ``on_batch`` sees the rows of each inference.
    """

    version: int
    session: Session
    manifest: dict
    folder: Path
    platform: str
    loaded_at: float = field(default_factory=time.time)
    max_batch_size: int = 0
    on_batch: Callable[[int], None] | None = None

    def infer(self, model: str, body: bytes, headers: Mapping[str, str]) -> tuple[bytes, dict[str, str]]:
        """Run one inference request body; returns the response body and its headers."""
        request, binary = split_body(body, headers)
        parsed = parse_request(request, binary, self.session.inputs, self.session.outputs,
                               max_batch_size=self.max_batch_size)
        return encode_response(model, self.version, parsed, self.run(parsed.feeds))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run decoded feeds: the batch cap checked first; the model's own refusals as RequestError."""
        rows = 1
        if self.max_batch_size > 0:
            for name, array in feeds.items():
                check_batch(name, list(np.shape(array)), self.max_batch_size)
            rows = max((int(np.shape(a)[0]) for a in feeds.values() if np.ndim(a)), default=1)
        try:
            results = self.session.run(feeds)
        except UserInputError as exc:
            raise RequestError(str(exc)) from None
        if self.on_batch is not None:
            self.on_batch(rows)
        return results


class LoadFailures:
    """Versions that failed to load: the error, and when to try again (exponential backoff)."""

    def __init__(self, base_delay: float) -> None:
        self.base_delay = base_delay
        self._lock = threading.Lock()
        self._failed: dict[int, tuple[str, float, int]] = {}  # version -> (error, retry at, tries)

    def remember(self, version: int, exc: BaseException) -> str:
        """Record a failed load; returns its message for the user."""
        message = str(exc) if isinstance(exc, ModelyardError) else f"{type(exc).__name__}: {exc}"
        with self._lock:
            tries = self._failed.get(version, ("", 0.0, 0))[2] + 1
            backoff = min(300.0, self.base_delay * 2 ** min(tries, 10))
            self._failed[version] = (message, time.time() + backoff, tries)
        return message

    def recent(self, version: int) -> str | None:
        """The error of a load of ``version`` that failed too recently to try again, or None."""
        with self._lock:
            failed = self._failed.get(version)
        return failed[0] if failed and time.time() < failed[1] else None

    def forget(self, version: int) -> None:
        with self._lock:
            self._failed.pop(version, None)


class VersionCache:
    """The served version, up to ``extra_versions`` others (LRU), and their download folder.

    A ``cache_dir`` of None is a temporary folder, removed by :meth:`close`.
    """

    def __init__(self, repository: ModelRepository, model: str, cache_dir: Path | str | None = None, *,
                 extra_versions: int = 1, threads: int = 2, device: Device | None = None,
                 max_batch_size: int | None = None, on_batch: Callable[[int], None] | None = None) -> None:
        model_dir = safe_relative(model)
        self.repository = repository
        self.model = model
        self.extra_versions = int(extra_versions)
        self.threads = threads
        self.device = device
        self.max_batch_size = max_batch_size  # None: each version's own (its Triton config's)
        self.on_batch = on_batch
        self._own_folder = cache_dir is None
        self.folder = Path(tempfile.mkdtemp(prefix="modelyard-serve-")) if cache_dir is None else Path(cache_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._model_folder = self.folder / model_dir  # <cache>/<model>/<version>/
        self._served: LoadedVersion | None = None
        self._extras: OrderedDict[int, LoadedVersion] = OrderedDict()
        self._lock = threading.Lock()  # guards _extras, _loading and _version_locks
        self._version_locks: dict[int, threading.Lock] = {}
        self._loading: set[int] = set()  # versions being downloaded and opened now

    @property
    def served(self) -> LoadedVersion | None:
        return self._served

    def serve(self, loaded: LoadedVersion) -> LoadedVersion | None:
        """Make ``loaded`` the served version; returns the one it replaces (kept as an extra).

        The swap is one reference assignment, atomic under the GIL: a request reads the
        served version once, so it finishes on the session it started with.
        """
        previous = self._served
        self._served = loaded
        with self._lock:
            self._extras.pop(loaded.version, None)
        if previous is not None:
            self.keep(previous)
        return previous

    def get(self, version: int) -> LoadedVersion | None:
        """The version if it is loaded (the served one or an extra), else None."""
        served = self._served
        if served is not None and served.version == version:
            return served
        with self._lock:
            extra = self._extras.get(version)
            if extra is not None:
                self._extras.move_to_end(version)
            return extra

    def keep(self, loaded: LoadedVersion) -> None:
        """Keep a version that is not served as the most recently used extra."""
        served = self._served
        if self.extra_versions <= 0 or (served is not None and served.version == loaded.version):
            return
        with self._lock:
            self._extras[loaded.version] = loaded
            self._extras.move_to_end(loaded.version)
            while len(self._extras) > self.extra_versions:
                self._extras.popitem(last=False)

    def load(self, version: int) -> LoadedVersion:
        """The version, loaded once however many threads ask for it at the same time.

        A version loaded here is not kept: :meth:`serve` or :meth:`keep` it. Raises on any failure.
        """
        with self._lock:
            lock = self._version_locks.setdefault(version, threading.Lock())
        with lock:
            loaded = self.get(version)
            if loaded is not None:
                return loaded
            with self._lock:
                self._loading.add(version)
            try:
                return self._open(version)
            finally:
                with self._lock:
                    self._loading.discard(version)

    def prune(self) -> None:
        """Delete downloaded versions no longer loaded (open sessions keep their memory)."""
        with self._lock:
            keep = {str(v) for v in (*self._extras, *self._loading)}
        served = self._served
        if served is not None:
            keep.add(str(served.version))
        for entry in self._model_folder.iterdir():
            if entry.is_dir() and entry.name.isdigit() and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    def close(self) -> None:
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _open(self, version: int) -> LoadedVersion:
        from shared.inference.runtime import load_session

        manifest = self.repository.manifest(self.model, version)
        folder = self._download(version, manifest)
        model_file = manifest.get("model_file") or _guess_model_file(folder)
        path = folder / safe_relative(model_file)
        if manifest.get("task") == GENERATION_TASK:  # a GenAI folder: OpenAI routes (serving.openai)
            session = GenerationEngine(folder, threads=self.threads)
        else:
            providers = self.device.providers_for(manifest, folder) if self.device else None
            session = load_session(path, threads=self.threads, providers=providers)
        platform = PLATFORMS.get(path.suffix.lower(), path.suffix.lstrip("."))
        return LoadedVersion(version=version, session=session, manifest=manifest, folder=folder, platform=platform,
                             max_batch_size=self._max_batch_size(manifest), on_batch=self.on_batch)

    def _max_batch_size(self, manifest: dict) -> int:
        """The version's cap: 0 without a batch axis, else ``max_batch_size`` if set, else its config's."""
        try:
            own = TritonConfig.from_manifest(self.model, manifest).max_batch_size
        except (UserInputError, KeyError, TypeError, ValueError):  # a manifest too old or odd to say
            return self.max_batch_size or 0
        if own <= 0:
            return 0
        return self.max_batch_size if self.max_batch_size is not None else own

    def _download(self, version: int, manifest: dict) -> Path:
        """The version's files in the cache folder, downloaded unless a complete copy is there."""
        target = self._model_folder / f"{version}"
        marker = target / ".complete"
        stamp = json.dumps(manifest, sort_keys=True)
        if marker.is_file() and marker.read_text() == stamp:
            return target  # a complete earlier download of this very version
        self._model_folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".part", dir=self._model_folder))
        try:
            prefix = f"{self.model}/{version}/"
            for key in self.repository.store.list(prefix):
                name = key[len(prefix):]
                if name == ".claim" or name.endswith(".lock"):
                    continue
                self.repository.store.get_object(key, tmp / safe_relative(name))
            (tmp / ".complete").write_text(stamp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target


def _guess_model_file(folder: Path) -> str:
    for suffix in PLATFORMS:
        found = sorted(folder.glob(f"*{suffix}"))
        if found:
            return found[0].name
    raise UserInputError(f"no .onnx or .tflite model file in {folder.name}")
