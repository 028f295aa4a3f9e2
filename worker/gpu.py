"""GPU discovery without initializing CUDA in the calling process."""

from __future__ import annotations

import subprocess
import sys

CUDA_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def available_providers() -> list[str]:
    """ONNX Runtime's execution providers, asked in a child process (so CUDA is not touched here)."""
    code = "import onnxruntime, json; print(json.dumps(onnxruntime.get_available_providers()))"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    except (subprocess.SubprocessError, OSError):
        return []
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def cuda_providers() -> list[str]:
    return [p for p in available_providers() if p in CUDA_PROVIDERS]
