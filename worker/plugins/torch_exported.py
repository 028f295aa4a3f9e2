"""A ``torch.export`` program saved as ``.pt2`` (``torch.export.save``) -> ONNX.

``torch.export.load`` is not safe on an untrusted file in torch 2.13, although the format is
mostly JSON (read in ``torch/export/pt2_archive/_package.py`` and ``torch/_export/serde/``):

- the sample inputs (``data/sample_inputs/<model>.pt``) are read with
  ``torch.load(weights_only=True)`` and, when that fails, *again with weights_only=False*: a
  pickle payload there runs (reproduced: a GLOBAL ``builtins.open`` creates its file);
- weights and constants marked ``use_pickle`` go through ``torch.load`` with ``weights_only`` off,
  ``opaque_obj_*`` constants through ``pickle.loads``, ``custom_obj_*`` through TorchScript's
  unpickler; legacy-format files keep a pickled state dict;
- ``data/aotinductor/`` holds compiled shared libraries, which ``load_pt2`` loads;
- a node's target is resolved by ``getattr`` from the ``torch`` module (``torch.os.system``
  resolves) and any callable is accepted and called when the program runs;
- symbolic shape expressions are parsed with ``sympy.sympify``, which evaluates its string
  with Python builtins in scope (reproduced: ``open(chr(..)+.., chr(119))`` creates a file at
  load time); ``ep.module()`` compiles the ``guards_code`` strings with ``exec`` into a
  function that runs on every call (reproduced likewise).

So the archive is checked first, with nothing loaded: only the members a plain exported program
has; no pickled payloads, no AOTInductor code, no legacy files; sample inputs that load with
``weights_only=True``; only tensor user inputs; every node target a torch ATen/prims operator (or
one of the symbolic-shape helpers); every shape expression and guard within a small grammar.
Only then does ``torch.export.load`` run.

Inputs are the program's own (dim 0 symbolic: ``batch``) unless the job gives ``model.inputs``.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from shared.errors import UserInputError
from worker.plugins.base import Converter, ConvertRequest, ConvertResult, TensorInfo

_TOP_FILES = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_SYM_HELPERS = {
    "_operator": {"getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "eq", "ne", "le", "ge",
                  "lt", "gt", "neg", "pos", "and_", "or_", "not_"},
    "math": {"trunc", "ceil", "floor", "sqrt"},
    "torch": {"sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt", "_sym_sqrt",
              "sym_sum"},
    "torch.ops.higher_order": {"cond", "while_loop", "map_impl", "wrap_with_set_grad_enabled",
                               "wrap_with_autocast"},
}
_OPERATOR = re.compile(r"^torch\.ops\.(aten|prims)\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")
_REFUSED_OPS = {"from_file"}  # reads a file on the worker
_SYMBOL = re.compile(r"Symbol\('([a-z]{1,4}\d+)'(?:, *[a-z_]+=(?:True|False))*\)")
_SYM_WORDS = {
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "Max", "Min", "Abs", "Pow", "Eq", "Ne", "Lt", "Le", "Gt",
    "Ge", "And", "Or", "Not", "True", "False", "oo", "int_oo", "Integer", "floor", "ceiling",
    "IsNonOverlappingAndDenseIndicator",
}
_GUARD_SOURCE = re.compile(r"L(?:\['[A-Za-z_][A-Za-z0-9_]*'\]|\[\d+\])+(?:\.(?:size|stride)\(\)\[\d+\]|\.storage_offset\(\))?")


class TorchExported(Converter):
    name = "torch-exported"
    targets = ("onnx",)
    tools = ("torch", "onnx", "onnxruntime")

    def convert(self, request: ConvertRequest) -> ConvertResult:
        import torch

        from worker.torch_onnx import convert_module, input_specs, one_line, single_file

        label = f"model.source {request.model.source}"
        source = single_file(Path(request.source), label, ".pt2 file", (".pt2",))
        check_program(source, label, max_bytes=request.settings.max_archive_bytes)
        try:
            program = torch.export.load(str(source))
            module = program.module()
        except UserInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - deserialization raises many unrelated types
            raise UserInputError(f"{label}: torch.export.load cannot load the program: {one_line(exc)}") from None
        for sub in module.modules():
            sub.training = False  # .eval() is refused by exported modules; the graph already fixed the mode
        declared = _declared_inputs(program)
        inputs = _match_inputs(input_specs(request, declared=declared), declared, label)
        return convert_module(module, inputs, request, label, preserve_training=True)


# ---------------------------------------------------------------------------------------------
# The archive check: nothing is unpickled or evaluated here.

def check_program(path: Path, label: str, *, max_bytes: int) -> None:
    """Refuse a .pt2 archive that torch.export.load could not read without running its contents."""
    from worker.pickle_scan import archive_root, open_zip

    with open_zip(path, label, max_bytes=max_bytes) as archive:
        root = archive_root(archive, label)
        members = [name[len(root):] for name in archive.namelist()]
        models = [m[len("models/"):-len(".json")] for m in members if m.startswith("models/") and m.endswith(".json")]
        if not models:
            raise UserInputError(f"{label}: not a torch.export program (no models/*.json); "
                                 "save it with torch.export.save(program, 'model.pt2')")
        allowed = set(_TOP_FILES)
        for model in models:
            allowed |= {f"models/{model}.json", f"data/sample_inputs/{model}.pt",
                        f"data/weights/{model}_weights_config.json", f"data/constants/{model}_constants_config.json"}
        for member in members:
            if member in allowed or member.startswith("extra/") or member.endswith("/"):
                continue
            if re.fullmatch(r"data/weights/weight_\d+|data/constants/tensor_\d+", member):
                continue
            what = "compiled AOTInductor code" if member.startswith("data/aotinductor/") else "an unexpected member"
            raise UserInputError(f"{label}: the archive holds {member} ({what}); only plain exported programs "
                                 "(weights, constants, graph) are accepted")
        for model in models:
            try:
                for config in (f"data/weights/{model}_weights_config.json",
                               f"data/constants/{model}_constants_config.json"):
                    _check_payload_config(_read_json(archive, root + config, label), config, label)
                sample = root + f"data/sample_inputs/{model}.pt"
                if sample in archive.namelist():
                    _check_sample_inputs(archive.read(sample), label)
                _check_graph(_read_json(archive, root + f"models/{model}.json", label), label)
            except (AttributeError, TypeError, KeyError, StopIteration) as exc:
                raise UserInputError(f"{label}: the program's {model} files are malformed ({type(exc).__name__}: "
                                     f"{str(exc)[:100]})") from None


def _read_json(archive, member: str, label: str):
    try:
        return json.loads(archive.read(member))
    except KeyError:
        raise UserInputError(f"{label}: the archive lacks {member.split('/', 1)[1]}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{label}: {member.split('/', 1)[1]} is not valid JSON ({exc})") from None


def _check_payload_config(config, name: str, label: str) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise UserInputError(f"{label}: {name} is malformed")
    for fqn, meta in entries.items():
        path_name = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False or not re.fullmatch(
            r"(weight|tensor)_\d+", path_name
        ):
            raise UserInputError(
                f"{label}: {name} stores {fqn!r} as a pickled object ({path_name or 'no path'}); pickles can run "
                "code when loaded, so the program is refused. Export plain tensors only"
            )


def _check_sample_inputs(data: bytes, label: str) -> None:
    import torch

    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError for a refused global
        from worker.pickle_scan import weights_only_reason

        raise UserInputError(
            f"{label}: the sample inputs inside the archive are not plain tensors ({weights_only_reason(exc)}); "
            "torch.export.load would unpickle them with weights_only=False, so the program is refused as unsafe"
        ) from None


def _check_graph(model: dict, label: str) -> None:
    graph_module = model.get("graph_module") if isinstance(model, dict) else None
    if not isinstance(graph_module, dict):
        raise UserInputError(f"{label}: models/*.json has no graph_module")
    for spec in graph_module.get("signature", {}).get("input_specs", []):
        kind, value = next(iter(spec.items())) if isinstance(spec, dict) and spec else (None, None)
        if kind not in ("parameter", "buffer", "tensor_constant", "user_input"):
            raise UserInputError(f"{label}: the program takes a {kind} input; only tensors are supported")
        if kind == "user_input" and "as_tensor" not in value.get("arg", {}):
            raise UserInputError(f"{label}: the program takes a non-tensor input "
                                 f"({next(iter(value.get('arg', {})), '?')}); only tensors are supported")
    if graph_module.get("graph", {}).get("custom_obj_values"):
        raise UserInputError(f"{label}: the program holds custom script objects; refused")
    for guard in model.get("guards_code") or []:
        if not _safe_guard(str(guard)):
            raise UserInputError(f"{label}: the program's guard {str(guard)[:80]!r} is not a shape check; refused")
    for key, value in _walk(model):
        if key == "target" and isinstance(value, str) and not _safe_target(value):
            raise UserInputError(
                f"{label}: the graph calls {value[:100]!r}, which is not a torch operator; refused as unsafe"
            )
        if key == "expr_str" and isinstance(value, str) and not _safe_expression(value):
            raise UserInputError(f"{label}: the shape expression {value[:80]!r} is not a plain expression; refused")


def _walk(value, key: str | None = None):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v
            yield from _walk(v, k)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item, key)


def _safe_target(target: str) -> bool:
    match = _OPERATOR.match(target)
    if match:
        return match.group(2) not in _REFUSED_OPS
    module, _, name = target.rpartition(".")
    return name in _SYM_HELPERS.get(module, ())


def _safe_expression(text: str) -> bool:
    """Symbols, integers, arithmetic and torch's sympy helper functions; nothing else."""
    text = _SYMBOL.sub(r"\1", text)
    if not re.fullmatch(r"[A-Za-z0-9_ +\-*/%(),<>=!.&|~]*", text) or re.search(r"\.\s*[A-Za-z_]", text):
        return False
    return all(re.fullmatch(r"[a-z]{1,4}\d+", word) or word in _SYM_WORDS
               for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))


def _safe_guard(text: str) -> bool:
    """A comparison of input sizes/strides with integers, as torch.export writes them."""
    text = _GUARD_SOURCE.sub("v", text)
    return bool(re.fullmatch(r"[v0-9 ()<>=!+\-*/%]*", text)) and "v" in text


# ---------------------------------------------------------------------------------------------

def _declared_inputs(program) -> list[TensorInfo]:
    """The program's user inputs: static dims as ints, symbolic ones named (dim 0: batch)."""
    import torch

    names = list(program.graph_signature.user_inputs)
    placeholders = {node.name: node for node in program.graph.find_nodes(op="placeholder")}
    infos = []
    for name in names:
        value = placeholders[name].meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise UserInputError(f"the program's input {name} is not a tensor; only tensor inputs are supported")
        shape: list[int | str] = [
            int(dim) if isinstance(dim, int) else ("batch" if i == 0 else f"{name}_dim{i}")
            for i, dim in enumerate(value.shape)
        ]
        infos.append(TensorInfo(name, str(value.dtype).removeprefix("torch."), shape))
    return infos


def _match_inputs(given: list[TensorInfo], declared: list[TensorInfo], label: str) -> list[TensorInfo]:
    """model.inputs (or the samples) checked against the program; returned in the program's order."""
    by_name = {t.name: t for t in given}
    names = [t.name for t in declared]
    if set(by_name) != set(names):
        raise UserInputError(
            f"model.inputs names {', '.join(by_name)} do not match the program's inputs {', '.join(names)}"
        )
    result = []
    for program_input in declared:
        tensor = by_name[program_input.name]
        if len(tensor.shape) != len(program_input.shape):
            raise UserInputError(f"model.inputs: {tensor.name} has {len(tensor.shape)} dimensions, "
                                 f"the program's has {len(program_input.shape)} {program_input.shape}")
        for i, (dim, fixed) in enumerate(zip(tensor.shape, program_input.shape)):
            if isinstance(fixed, int) and dim != fixed:
                raise UserInputError(
                    f"model.inputs: {tensor.name} dimension {i} is {dim!r}, but {label} fixes it at {fixed} "
                    "(export with dynamic_shapes to make it dynamic)"
                )
        result.append(TensorInfo(tensor.name, program_input.dtype, list(tensor.shape)))
    return result
