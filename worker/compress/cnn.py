"""Channel pruning of convolution layers by L1 norm, for torch modules built from a factory.

The module is traced with ``torch.fx``. A ``Conv2d`` (groups 1) is prunable when everything its
output flows into, through BatchNorm, activations, pooling and dropout, ends in the input of
another ``Conv2d`` or, after a flatten, of a ``Linear``; an output that reaches an addition, a
concatenation or the model's output (residual blocks, skip connections) leaves that conv as it
is. Each prunable conv keeps the ``keep`` filters (a count, or a ratio of its filters) with the
largest L1 norm, in their original order; the BatchNorm after it and the inputs of the layers
it feeds are cut to match. The result is the same module tree with smaller modules in it: fewer
parameters and FLOPs, no masks.

Rebuilding the student (for the convert stage): ``architecture.json`` beside the weights records
the teacher's factory and the new size of every module that changed. ``build()`` — the factory
``worker.compress.cnn:build`` — calls the teacher's factory and swaps in modules of those sizes,
so ``load_state_dict(strict=True)`` of the student's safetensors fits it. The convert stage
binds the architecture (``bound(architecture)``) around the conversion; the teacher's factory
is checked against ``MODELYARD_ALLOWED_FACTORIES`` as for any torch-state-dict job.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np

from shared.errors import UserInputError

FACTORY = "worker.compress.cnn:build"
ARCHITECTURE = "architecture.json"
PASSTHROUGH_MODULES = ("BatchNorm2d", "ReLU", "ReLU6", "LeakyReLU", "GELU", "SiLU", "Hardswish", "Tanh", "Sigmoid",
                       "ELU", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "Dropout",
                       "Dropout2d", "Identity")
PASSTHROUGH_FUNCTIONS = ("relu", "relu6", "gelu", "silu", "leaky_relu", "max_pool2d", "avg_pool2d", "dropout",
                         "adaptive_avg_pool2d", "adaptive_max_pool2d", "sigmoid", "tanh", "hardswish")
FLATTEN = ("flatten", "view", "reshape")

_bound: ContextVar[dict | None] = ContextVar("modelyard_cnn_architecture", default=None)


@contextmanager
def bound(architecture: dict) -> Iterator[None]:
    """Make ``build()`` (called with no arguments by a converter) build this architecture."""
    token = _bound.set(architecture)
    try:
        yield
    finally:
        _bound.reset(token)


def build(architecture: dict | None = None):
    """The pruned student's module (weights not loaded): the teacher's factory, resized."""
    architecture = architecture or _bound.get()
    if architecture is None:
        raise UserInputError(
            f"{FACTORY} rebuilds a student pruned by the compress stage from its {ARCHITECTURE}; "
            "it is not a factory a job can name by itself"
        )
    model = call_factory(architecture["factory"])
    for name, sizes in architecture["modules"].items():
        _replace(model, name, _resized(model.get_submodule(name), sizes))
    return model


def call_factory(factory: str):
    import torch

    module_name, _, attr = factory.partition(":")
    builder = getattr(importlib.import_module(module_name), attr)
    model = builder()
    if not isinstance(model, torch.nn.Module):
        raise UserInputError(f"model.factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _resized(module, sizes: dict):
    import torch

    kind = type(module).__name__
    if kind == "Conv2d":
        return torch.nn.Conv2d(sizes["in_channels"], sizes["out_channels"], module.kernel_size, module.stride,
                               module.padding, module.dilation, module.groups, module.bias is not None,
                               module.padding_mode)
    if kind == "BatchNorm2d":
        return torch.nn.BatchNorm2d(sizes["num_features"], module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
    if kind == "Linear":
        return torch.nn.Linear(sizes["in_features"], module.out_features, module.bias is not None)
    raise UserInputError(f"{ARCHITECTURE}: cannot resize a {kind}")


def _replace(model, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _sizes(module) -> dict:
    kind = type(module).__name__
    if kind == "Conv2d":
        return {"in_channels": module.in_channels, "out_channels": module.out_channels}
    if kind == "BatchNorm2d":
        return {"num_features": module.num_features}
    return {"in_features": module.in_features}


# -- finding what a conv's output feeds ----------------------------------------------------

def _kind(graph_module, node) -> str:
    if node.op == "call_module":
        return type(graph_module.get_submodule(node.target)).__name__
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def _consumers(graph_module, conv_node) -> tuple[list, list, list] | None:
    """(batchnorm names, conv names fed, [(linear name, spatial size)]) or None when not prunable."""
    norms, convs, linears = [], [], []
    frontier, seen = list(conv_node.users), set()
    spatial = None
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        kind = _kind(graph_module, node)
        if kind == "Conv2d" and graph_module.get_submodule(node.target).groups == 1 and node.args[0] in seen | {
                conv_node}:
            convs.append(node.target)
            continue
        if kind == "Linear" and spatial is not None:
            linears.append((node.target, spatial))
            continue
        if kind in PASSTHROUGH_MODULES or kind in PASSTHROUGH_FUNCTIONS:
            if kind == "BatchNorm2d":
                norms.append(node.target)
            if any(arg in seen or arg is conv_node for arg in node.args[1:] if hasattr(arg, "op")):
                return None
            frontier.extend(node.users)
            continue
        if kind in FLATTEN or kind == "Flatten":
            shape = node.args[0].meta.get("tensor_meta").shape if hasattr(node.args[0], "meta") else None
            if shape is None or len(shape) != 4:
                return None
            spatial = int(shape[2]) * int(shape[3])
            frontier.extend(node.users)
            continue
        return None  # an add, a concatenation, the output: the channels are shared with something else
    return norms, convs, linears


def plan(model, example) -> dict:
    """Every prunable conv: {conv name: (norm names, conv names fed, [(linear, spatial)])}."""
    import torch.fx
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        graph_module = torch.fx.symbolic_trace(model)
        ShapeProp(graph_module).propagate(*example)
    except Exception:
        raise UserInputError("compress.prune channels: the model cannot be traced with torch.fx: "
                             "{one_line(exc)}") from None
    found = {}
    for node in graph_module.graph.nodes:
        if _kind(graph_module, node) == "Conv2d" and graph_module.get_submodule(node.target).groups == 1:
            consumers = _consumers(graph_module, node)
            if consumers is not None and (consumers[1] or consumers[2]):
                found[node.target] = consumers
    return found


def prune_channels(model, keep: float, example, factory: str) -> tuple[Any, dict]:
    """The pruned copy of model and its architecture record (for ``build``)."""
    import copy

    import torch

    student = copy.deepcopy(model).eval()
    prunable = plan(student, example)
    if not prunable:
        raise UserInputError("compress.prune channels: no convolution whose channels can be pruned was found "
                             "(every conv feeds an addition, concatenation or the output)")
    keep_out: dict[str, torch.Tensor] = {}
    keep_in: dict[str, torch.Tensor] = {}
    kept_report = {}
    for name, (norms, convs, linears) in prunable.items():
        conv = student.get_submodule(name)
        total = conv.out_channels
        k = keep if isinstance(keep, int) else max(1, round(keep * total))
        if k > total:
            raise UserInputError(f"compress.prune.keep {keep}: conv {name} has only {total} channels")
        l1 = conv.weight.detach().abs().sum(dim=(1, 2, 3))
        kept = torch.sort(torch.topk(l1, k).indices).values
        keep_out[name] = kept
        for norm in norms:
            keep_out[norm] = kept
        for fed in convs:
            keep_in[fed] = kept
        for linear, spatial in linears:
            keep_in[linear] = (kept.unsqueeze(1) * spatial + torch.arange(spatial).unsqueeze(0)).reshape(-1)
        kept_report[name] = f"{k}/{total}"
    changed = {}
    for name in sorted(set(keep_out) | set(keep_in)):
        old = student.get_submodule(name)
        new = _sliced(old, keep_out.get(name), keep_in.get(name))
        _replace(student, name, new)
        changed[name] = _sizes(new)
    return student, {"factory": factory, "modules": changed, "kept": kept_report}


def _sliced(module, out_index, in_index):
    import torch

    kind = type(module).__name__
    with torch.no_grad():
        if kind == "BatchNorm2d":
            new = _resized(module, {"num_features": len(out_index)})
            for attr in ("weight", "bias", "running_mean", "running_var"):
                value = getattr(module, attr)
                if value is not None:
                    getattr(new, attr).copy_(value[out_index])
            if module.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(module.num_batches_tracked)
            return new
        weight = module.weight.detach()
        bias = module.bias.detach() if module.bias is not None else None
        if out_index is not None:
            weight = weight[out_index]
            bias = bias[out_index] if bias is not None else None
        if in_index is not None:
            weight = weight[:, in_index]
        if kind == "Conv2d":
            new = _resized(module, {"in_channels": weight.shape[1], "out_channels": weight.shape[0]})
        else:
            new = _resized(module, {"in_features": weight.shape[1]})
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
        return new


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def example_inputs(data: dict[str, np.ndarray], rows: int = 2) -> tuple:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(a[:rows])) for a in data.values())
