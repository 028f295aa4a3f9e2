"""The Celery app that ``celery -A worker.app worker -Q cpu|gpu`` starts.

Importing this module must stay light: no torch, tensorflow or onnxruntime here (a prefork
worker whose parent imported them hangs in its children). Plugins import them when they run.
"""

from __future__ import annotations

from typing import Any

from celery import signals

from shared.celery_app import configured_broker_url, make_celery
from shared.settings import get_settings
from worker import gpu  # noqa: F401  (pins each gpu-pool child to its GPU in worker_process_init)
from worker.sandbox import startup  # noqa: F401  (checks the model-load sandbox in worker_init)

app = make_celery(get_settings())
app.autodiscover_tasks(["worker"], related_name="tasks", force=True)


@signals.worker_process_init.connect(weak=False)
def prestart_sandboxes(**_kwargs: Any) -> None:
    """Each pool process keeps its next model-load sandbox started (``worker.sandbox.warm``)."""
    from worker.sandbox import warm

    warm.enable()


@signals.worker_ready.connect(weak=False)
def start_redrive(sender: Any = None, **_kwargs: Any) -> None:
    """The main process's scan for jobs whose next stage's message was lost (``worker.redrive``)."""
    from worker import redrive

    redrive.start(configured_broker_url(app.conf), get_settings(), getattr(sender, "hostname", None) or "worker")
