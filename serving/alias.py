"""Following ``model@ref`` as its alias moves: resolve, load the new version completely, swap.

A background thread resolves the ref every ``poll_interval`` seconds. When it names another
version, that version is downloaded and opened *before* the served reference is swapped, so
no request is dropped. A version that fails to load leaves the old one serving: the error is
logged and kept as ``last_error`` (shown in the model metadata), and the version is retried
with backoff. A ref that is a version number never moves and is not polled.
"""

from __future__ import annotations

import logging
import threading
import time

from serving.versions import LoadFailures, VersionCache
from shared.repository import ModelRepository

log = logging.getLogger("modelyard.serving")


class AliasFollower:
    """Keeps the version cache serving the version that ``model@ref`` names."""

    def __init__(self, repository: ModelRepository, model: str, ref: str, versions: VersionCache,
                 failures: LoadFailures, *, poll_interval: float = 5.0) -> None:
        self.repository = repository
        self.model = model
        self.ref = ref
        self.versions = versions
        self.failures = failures
        self.poll_interval = poll_interval
        self.available: list[int] = []  # the model's versions at the last poll
        self.last_poll: float | None = None
        self.last_error: dict | None = None  # the last failed resolve or load, until one succeeds
        self.swaps = 0
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    @property
    def polling(self) -> bool:
        return self._poller is not None

    def start(self) -> None:
        """Load and serve the version the ref names now; UserInputError if it does not exist or load."""
        version = self.repository.resolve(self.model, self.ref)
        self.available = self.repository.versions(self.model)
        self.versions.serve(self.versions.load(version))
        self.last_poll = time.time()
        log.info("serving %s version %d (%s)", self.model, version, self.ref)

    def poll_once(self) -> bool:
        """Resolve the ref again; load and swap to a new version. True when it swapped."""
        try:
            version = self.repository.resolve(self.model, self.ref)
            self.available = self.repository.versions(self.model)
        except Exception as exc:  # a poll failure must never stop the poller
            self._report(None, f"cannot resolve {self.model}@{self.ref}: {exc}")
            return False
        finally:
            self.last_poll = time.time()
        served = self.versions.served
        if served is not None and served.version == version:
            self.last_error = None  # serving what the ref names (an earlier poll may have failed)
            return False
        if self.failures.recent(version) is not None:
            return False  # this version failed to load recently; retry it later, keep serving
        try:
            loaded = self.versions.load(version)
        except Exception as exc:  # a version that does not load must not stop the serving one
            self._report(version, self.failures.remember(version, exc))
            return False
        previous = self.versions.serve(loaded)
        self.swaps += 1
        self.failures.forget(version)
        self.last_error = None
        log.info("%s@%s: now serving version %d (was %s)", self.model, self.ref, version,
                 previous.version if previous else None)
        self.versions.prune()
        return True

    def start_polling(self) -> None:
        """Poll in a daemon thread until :meth:`stop`; a fixed version number is never polled."""
        if self.ref.isdigit() or self._poller is not None:
            return
        self._stop.clear()
        self._poller = threading.Thread(target=self._poll_loop, name="modelyard-poller", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
            self._poller = None

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self.poll_once()

    def _report(self, version: int | None, message: str) -> None:
        served = self.versions.served
        self.last_error = {"version": version, "error": message, "at": time.time(),
                           "serving": served.version if served else None}
        log.error("%s@%s: version %s not loaded, still serving %s: %s", self.model, self.ref, version,
                  served.version if served else "nothing", message)
