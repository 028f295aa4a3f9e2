"""Where ``modelyard serve`` runs a model: ``--device cpu``, ``cuda`` or ``tensorrt``.

A device is a list of ONNX Runtime execution providers, best first. A provider that
``onnxruntime.get_available_providers()`` lists can still fail to load (CUDA or cuDNN libraries
missing, a driver too old, no TensorRT): ONNX Runtime then logs an error and quietly runs the
session on the CPU. So each requested provider is *tried* by creating a session on a one-node
model and reading the providers that session really got. A provider that does not load falls
back to the next (``tensorrt`` -> ``cuda`` -> ``cpu``); the outcome, with the reason for each
fallback, is logged at start and shown in the model metadata (``device``) and the
``modelyard_serve_device_info`` metric. ``strict`` refuses to start instead of falling back.
The GPU image checks its device when a container starts: :mod:`serving.device_check`.

Under ``tensorrt``, a ``trt-fp16`` / ``trt-int8`` version runs at its own precision with the
engine cache it was deployed with (``trt_cache/`` in its folder); any other version gets a
TensorRT engine built at load into its folder's ``trt_cache/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import UserInputError, one_line

TENSORRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
DEVICES = {"cpu": [CPU], "cuda": [CUDA, CPU], "tensorrt": [TENSORRT, CUDA, CPU]}
ENGINE_CACHE = "trt_cache"  # as worker.gpu.ENGINE_CACHE: the folder a TensorRT version ships its engine in


def probe_provider(provider: str) -> str | None:
    """None when a session really runs under ``provider``; else why not, in one line."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    available = ort.get_available_providers()
    if provider not in available:
        return f"not in this ONNX Runtime build (available: {', '.join(available)})"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the failure is reported here, not as ONNX Runtime's own error lines
    try:
        session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=[provider, CPU])
    except Exception as exc:
        return f"a session could not be created: {one_line(exc)}"
    if provider not in session.get_providers():
        return "listed, but it did not load (a session created with it fell back to the CPU)"
    return None


@dataclass(frozen=True)
class Device:
    """The providers chosen for ``requested``, and why each better one was not used."""

    requested: str
    providers: tuple[str, ...]
    fallbacks: dict[str, str] = field(default_factory=dict)  # provider -> why it is not used

    @classmethod
    def choose(cls, requested: str = "cpu", *, strict: bool = False, probe=probe_provider) -> Device:
        """Try the device's providers best first; UserInputError for an unknown device or, when strict, a fallback."""
        if requested not in DEVICES:
            raise UserInputError(f"device {requested!r} is not one of {', '.join(DEVICES)}")
        usable: list[str] = []
        fallbacks: dict[str, str] = {}
        for provider in DEVICES[requested]:
            reason = None if provider == CPU else probe(provider)
            if reason is None:
                usable.append(provider)
            else:
                fallbacks[provider] = reason
        device = cls(requested=requested, providers=tuple(usable), fallbacks=fallbacks)
        if strict and fallbacks:
            raise UserInputError(f"{device.describe()}; the fallback is refused (strict device)")
        return device

    @property
    def primary(self) -> str:
        return self.providers[0]

    def describe(self) -> str:
        """One line for the start-up log: what runs, and each fallback with its reason."""
        text = f"device {self.requested}: running on {self.primary}"
        for provider, reason in self.fallbacks.items():
            text += f"; {provider} not used: {reason}"
        return text

    def providers_for(self, manifest: Mapping[str, Any], folder: Path) -> list[str | tuple[str, dict]]:
        """The providers one version is loaded with (a TensorRT version's precision and engine cache)."""
        chosen: list[str | tuple[str, dict]] = list(self.providers)
        if TENSORRT in self.providers:
            chosen[0] = (TENSORRT, tensorrt_options(manifest, folder))
        return chosen

    def report(self) -> dict[str, Any]:
        return {"requested": self.requested, "providers": list(self.providers), "fallbacks": dict(self.fallbacks)}


def tensorrt_options(manifest: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """TensorRT provider options for a version: its deployed precision and engine cache, else FP32 built here."""
    tensorrt = (manifest.get("triton") or {}).get("tensorrt") or {}
    precision = str(tensorrt.get("precision", "FP32")).upper()
    options: dict[str, Any] = {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(folder / ENGINE_CACHE),
        "trt_fp16_enable": precision in ("FP16", "INT8"),
        "trt_int8_enable": precision == "INT8",
    }
    table = tensorrt.get("calibration_table")
    if precision == "INT8" and table and (folder / ENGINE_CACHE / table).is_file():
        options["trt_int8_calibration_table_name"] = table
    return options

