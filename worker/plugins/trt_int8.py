"""``trt-int8``: the model served by ONNX Runtime's TensorRT execution provider in INT8 (FP16 fallback).

A model that already holds QuantizeLinear/DequantizeLinear pairs (``int8-static+trt-int8``) is
built as it is (explicit quantization). Otherwise activation ranges are calibrated here with
ONNX Runtime's MinMax calibrator on the job's samples, on the CPU, and written as
``trt_cache/calibration.flatbuffers``, the table the TensorRT provider reads
(``trt_int8_calibration_table_name``). The engine and the table are stored with the model, as
for ``trt-fp16``.

Refused with a UserInputError on a worker whose ONNX Runtime has no TensorRT execution provider.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from shared.errors import UserInputError
from worker.plugins.base import Arrays, Optimizer, OptimizeRequest
from worker.plugins.int8_dynamic import check_params
from worker.plugins.trt_fp16 import build_engine


class TrtInt8(Optimizer):
    name = "trt-int8"
    applies_to = ("onnx",)
    gpu_benefit = True
    tensorrt = "int8"  # read by worker.gpu.Execution
    tools = ("onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt")

    def optimize(self, request: OptimizeRequest) -> Path:
        check_params(self.name, dict(request.params), {})
        if not request.samples:
            raise UserInputError(f"optimize variant {self.name} needs calibration samples (model.samples)")
        return build_engine(request, self.tensorrt,
                            prepare=lambda model, cache: write_calibration(model, request.samples, cache))


def has_qdq(model: Path) -> bool:
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in proto.graph.node)


def write_calibration(model: Path, samples: Arrays, folder: Path) -> Path | None:
    """MinMax activation ranges of ``model`` on ``samples`` as TensorRT's table in ``folder``; None for QDQ."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator
    from onnxruntime.quantization.quant_utils import write_calibration_table

    from worker.gpu import CALIBRATION_TABLE

    if has_qdq(model):
        return None
    rows = len(next(iter(samples.values())))
    feeds = iter([{name: np.ascontiguousarray(value[i:i + 1]) for name, value in samples.items()}
                  for i in range(rows)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    scratch = Path(tempfile.mkdtemp(prefix="trt-int8-calib-", dir=folder.parent))
    try:
        calibrator = create_calibrator(str(model), augmented_model_path=str(scratch / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax,
                                       use_external_data_format=True, providers=["CPUExecutionProvider"])
        calibrator.collect_data(Reader())
        write_calibration_table(calibrator.compute_data(), dir=str(folder))
    except Exception as exc:  # noqa: BLE001
        message = " ".join(str(exc).split())[:300]
        raise UserInputError(f"trt-int8 could not calibrate {model.name}: {type(exc).__name__}: {message}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder / CALIBRATION_TABLE
