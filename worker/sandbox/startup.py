"""The worker's start-up check of the model-load sandbox (``worker_init``: the main process, before forking).

The check runs a trivial sandboxed child. Its outcome is kept in the main process, so the pool's
forked processes inherit it; it is logged once, loudly when the operator turned the sandbox off
or when it does not work (then every untrusted load fails until it does; the worker stays up
for everything else).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from shared.settings import get_settings
from worker.sandbox.limits import Limits
from worker.sandbox.status import sandbox_status

log = logging.getLogger("modelyard.sandbox")


@signals.worker_init.connect(weak=False)
def check_sandbox_at_start(sender: Any = None, **_kwargs: Any) -> None:
    settings = get_settings()
    status = sandbox_status(settings)
    if status.mode == "off":
        log.warning("MODELYARD_SANDBOX=off: untrusted models are loaded UNSANDBOXED, in the worker process itself, "
                    "with its network, files and credentials; each convert manifest records sandbox: off")
    elif not status.works:
        log.error("the model-load sandbox does not work on this worker: %s. Every convert fails until it does "
                  "(or MODELYARD_SANDBOX=off is set)", status.problem)
    else:
        limits = Limits.from_settings(settings)
        log.info("model loads run in a bubblewrap sandbox (checked in %.2f s): memory %d MB, CPU %d s, files %d MB, "
                 "%d processes, wall %d s", status.seconds, limits.memory_mb, limits.cpu_s, limits.file_mb,
                 limits.procs, limits.wall_s)
