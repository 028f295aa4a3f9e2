"""A test-only optimizer, ``gpu-probe``: records which GPU its worker process was pinned to.

Loaded by workers and producers started with ``MODELYARD_PLUGIN_MODULES=tests.plugins.gpu_probe``.
It benefits from a GPU (so ``device: gpu`` routes it to the gpu pool), appends
``{"pid", "cuda_visible_devices"}`` to the Redis list ``modelyard:test:gpu-probe``, waits
``params.seconds`` (so that concurrent variants land on different worker processes) and returns
the model unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from shared.broker import redis_client
from shared.settings import get_settings
from worker.plugins.base import Optimizer, OptimizeRequest, Param

PROBES = "modelyard:test:gpu-probe"


class GpuProbe(Optimizer):
    name = "gpu-probe"
    gpu_benefit = True
    params = {"seconds": Param(float, 1.0, "how long to hold the worker process", min=0.0)}

    def optimize(self, request: OptimizeRequest) -> Path:
        client = redis_client(get_settings().resolved_broker_url())
        try:
            client.rpush(PROBES, json.dumps({"pid": os.getpid(),
                                             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}))
        finally:
            client.close()
        time.sleep(float(request.params.get("seconds", 1.0)))
        target = Path(request.workdir) / Path(request.model).name
        shutil.copyfile(request.model, target)
        return target
