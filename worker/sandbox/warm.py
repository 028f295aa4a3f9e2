"""A sandbox started before its model arrives: the frameworks are imported while the worker waits.

A sandboxed convert pays for a fresh interpreter importing torch and transformers (about 3.5 s
of the 6.5 s it adds on MiniLM, on a 2-core Xeon). A worker process that has converted once
starts the next sandbox right away (``prestart``): the same bwrap command, namespaces and
limits, the same unprivileged uid, but its child first imports the frameworks
(``child.PREIMPORT``) and then waits for its request. No user input exists while it imports,
and it serves exactly one request, then ends like any other sandbox.

What differs is only where the request's files are: the source is placed (hard links to the
stage's private download, else a copy; symlinks stay symlinks, resolved inside the sandbox as
before) in a folder bound read-only into the sandbox before it started, and the outputs are
moved from the sandbox's out folder into the stage's workdir when it has ended.

``MODELYARD_SANDBOX_WARM=false`` turns it off. Only Celery worker processes prestart
(``enable``); ``modelyard run`` and scripts convert cold. An idle warm sandbox holds the
imported frameworks' memory (about 0.5 GB) until its worker process ends.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from shared.settings import Settings
from worker.sandbox import bubblewrap
from worker.sandbox.limits import Limits
from worker.sandbox.process import Finished, Started, finish_child, start_child, stop_child

_enabled = False
_ready: WarmBox | None = None


def enable() -> None:
    """This process prestarts sandboxes (a Celery worker process, from ``worker.app``)."""
    global _enabled
    _enabled = True


def disable() -> None:
    """Stop prestarting, and end the sandbox waiting, if any (benchmarks compare cold and warm)."""
    global _enabled, _ready
    _enabled = False
    if _ready is not None:
        _ready.discard()
        _ready = None


def take(settings: Settings) -> WarmBox | None:
    """The warm sandbox this process started, if it is alive and made for these settings; it is then
    no longer this process's (one request each)."""
    global _ready
    box, _ready = _ready, None
    if box is None:
        return None
    if box.usable(settings):
        return box
    box.discard()
    return None


def prestart(settings: Settings) -> None:
    """Start the next sandbox now, unless one is waiting or prestarting is off."""
    global _ready
    if not _enabled or not settings.sandbox_warm or settings.sandbox == "off":
        return
    if _ready is not None and _ready.usable(settings):
        return
    try:
        _ready = WarmBox(settings)
    except OSError:  # a full disk, bwrap gone: the next convert starts cold and says why
        _ready = None


class WarmBox:
    def __init__(self, settings: Settings) -> None:
        self.settings_key = _key(settings)
        self.limits = Limits.from_settings(settings)
        self.pid = os.getpid()
        self.root = Path(tempfile.mkdtemp(prefix="modelyard-warm-"))
        self.box, self.source, self.out = self.root / "box", self.root / "source", self.root / "out"
        for folder in (self.box / "io", self.box / "home", self.box / "tmp", self.box / "source", self.box / "out",
                       self.source, self.out):
            folder.mkdir(parents=True)
        privileged = os.geteuid() == 0
        self.uid = bubblewrap.sandbox_uid() if privileged else None
        (self.box / "io" / "boot.json").write_text(json.dumps({"limits": self.limits.to_dict(),
                                                               "drop_to_uid": self.uid}))
        if self.uid is not None:
            for folder in (self.root, self.box, self.source, self.out):
                bubblewrap.chown_tree(folder, self.uid)
        self.started: Started = start_child(self.box, settings, source=self.source, workdir=self.out,
                                            privileged=privileged, warm=True)

    def usable(self, settings: Settings) -> bool:
        return (os.getpid() == self.pid and self.started.process.poll() is None
                and _key(settings) == self.settings_key)

    def place(self, source: Path, private: bool) -> Path:
        """Put the request's source where the sandbox sees it; its path inside."""
        target = self.source / source.name
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, target, symlinks=True, copy_function=_linker(private))
        elif source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            _linker(private)(source, target)
        if self.uid is not None:
            bubblewrap.chown_tree(target, self.uid)
        return bubblewrap.INSIDE / "source" / self.source.name / source.name

    def start(self, request: dict) -> None:
        """Hand the request over: the inputs are in ``io`` already; the request is renamed in last."""
        io = self.box / "io"
        partial = io / "request.json.partial"
        partial.write_text(json.dumps(request, default=str))
        partial.rename(io / "request.json")

    def io(self) -> Path:
        return self.box / "io"

    def finish(self, workdir: Path) -> Finished:
        """Wait for the sandbox to end (the wall-clock limit from now), then move its outputs to workdir."""
        finished = finish_child(self.started, self.limits.wall_s)
        workdir.mkdir(parents=True, exist_ok=True)
        for entry in self.out.iterdir():
            shutil.move(str(entry), str(workdir / entry.name))
        return finished

    def discard(self) -> None:
        """End it (a sandbox still waiting for a request it will never get) and remove its folders."""
        if self.started.process.poll() is None:
            stop_child(self.started)
        else:
            self.started.log_path.unlink(missing_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _key(settings: Settings) -> tuple:
    """What a warm sandbox was made with: a change of any of it makes a new one."""
    return (Limits.from_settings(settings), str(settings.stack_file), settings.resolved_artifact_store(),
            str(settings.home_dir), os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"))


def _linker(private: bool):
    """Hard links for the stage's own download (same filesystem, handed to the sandbox's uid), else copies."""
    def link(src, dst, **_kwargs):
        if private:
            try:
                os.link(src, dst)
                return dst
            except OSError:
                pass
        return shutil.copy2(src, dst)

    return link
