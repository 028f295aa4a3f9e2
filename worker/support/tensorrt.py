"""Building TensorRT engines ahead of time, for the ``trt-fp16`` and ``trt-int8`` variants.

The ONNX file stays as it is; ONNX Runtime's TensorRT execution provider builds an engine for
it on the samples, into ``trt_cache/`` beside the model (``worker.gpu.ENGINE_CACHE``), and the
engine is stored as an artifact with the model. For INT8 without QuantizeLinear /
DequantizeLinear pairs, activation ranges are calibrated first with ONNX Runtime's MinMax
calibrator on the CPU and written as the table the TensorRT provider reads.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shared.arrays import Arrays
from shared.errors import UserInputError, one_line
from worker.support.onnx_files import stage_copy
from worker.support.plugin_io import OptimizeRequest


def build_engine(request: OptimizeRequest, precision: str,
                 prepare: Callable[[Path, Path], object] | None = None) -> Path:
    """Copy the model into the workdir and build its TensorRT engine into workdir/trt_cache.

    ``prepare(model, engine_cache)`` runs before the build (the INT8 calibration table).
    """
    import onnxruntime

    from shared.inference.runtime import load_session
    from worker.gpu import ENGINE_CACHE, choose_providers

    available = onnxruntime.get_available_providers()
    engine_cache = Path(request.workdir).absolute() / ENGINE_CACHE
    providers = choose_providers("gpu", available, tensorrt=precision, engine_cache=engine_cache,
                                 worker=socket.gethostname())  # refuses first when TensorRT is absent
    model = stage_copy(Path(request.model).absolute(), Path(request.workdir).absolute())
    engine_cache.mkdir(exist_ok=True)
    if prepare is not None:
        prepare(model, engine_cache)
        providers = choose_providers("gpu", available, tensorrt=precision, engine_cache=engine_cache)
    session = load_session(model, threads=1, providers=providers)
    session.run(request.samples)  # builds the engine and writes it to the cache
    return model


def has_qdq(model: Path) -> bool:
    """True when the model is already quantized explicitly (QuantizeLinear / DequantizeLinear)."""
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
    except Exception as exc:
        message = one_line(exc)
        raise UserInputError(f"trt-int8 could not calibrate {model.name}: {type(exc).__name__}: {message}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder / CALIBRATION_TABLE
