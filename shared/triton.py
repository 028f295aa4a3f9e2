"""Triton ``config.pbtxt`` for a model in the repository."""

from __future__ import annotations

TRITON_DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
    "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}
PLATFORMS = {"onnx": 'platform: "onnxruntime_onnx"', "tflite": 'backend: "tflite"'}


def has_batch_axis(tensors: list[dict]) -> bool:
    """True when every tensor's first dimension is the symbolic 'batch' axis."""
    return bool(tensors) and all(t["shape"] and t["shape"][0] == "batch" for t in tensors)


def config_pbtxt(name: str, model_format: str, inputs: list[dict], outputs: list[dict], *,
                 max_batch_size: int = 64) -> str:
    batched = has_batch_axis(inputs + outputs)
    lines = [f'name: "{name}"', PLATFORMS[model_format], f"max_batch_size: {max_batch_size if batched else 0}"]
    for section, tensors in (("input", inputs), ("output", outputs)):
        entries = []
        for tensor in tensors:
            dims = tensor["shape"][1:] if batched else tensor["shape"]
            dims_text = ", ".join(str(d) if isinstance(d, int) else "-1" for d in dims)
            dtype = TRITON_DTYPES[tensor["dtype"]]
            entries.append(f'  {{\n    name: "{tensor["name"]}"\n    data_type: {dtype}\n    dims: [ {dims_text} ]\n  }}')
        lines.append(f"{section} [\n" + ",\n".join(entries) + "\n]")
    if batched:
        lines.append("dynamic_batching { }")
    lines.append('version_policy: { all { } }')
    return "\n".join(lines) + "\n"
