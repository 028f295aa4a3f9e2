"""A test-only optimizer, ``row-recorder``: records which sample rows it was given, returns the model unchanged.

Loaded by workers and producers started with ``MODELYARD_PLUGIN_MODULES=tests.plugins.row_recorder``.
Appends ``{"first": [first value of each row of the first input], "reference": [output names],
"gate": {...}}`` to the Redis list ``modelyard:test:rows:<variant params' tag>``, so a test can
check that the rows the gate measured on never reached an optimizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from shared.broker import redis_client
from shared.settings import get_settings
from worker.plugins.base import Optimizer, OptimizeRequest, Param

ROWS = "modelyard:test:rows:"


class RowRecorder(Optimizer):
    name = "row-recorder"
    params = {"tag": Param(str, "default", "the Redis list the rows are recorded under")}

    def optimize(self, request: OptimizeRequest) -> Path:
        first = np.asarray(next(iter(request.samples.values())))
        entry = {"first": first.reshape(len(first), -1)[:, 0].tolist(), "reference": sorted(request.reference),
                 "reference_rows": [len(v) for v in request.reference.values()], "gate": request.gate}
        client = redis_client(get_settings().resolved_broker_url())
        try:
            client.rpush(ROWS + request.params["tag"], json.dumps(entry))
        finally:
            client.close()
        target = Path(request.workdir) / Path(request.model).name
        shutil.copyfile(request.model, target)
        return target
