"""The check of a ``.pt2`` archive before ``torch.export.load`` sees it; nothing is unpickled or evaluated.

What ``torch.export.load`` would run from an untrusted archive, and so what is refused here, is
listed in ``worker/plugins/torch_exported.py``. The archive comes from ``worker.support.zip_check``
(one copy of each member). Accepted: the members a plain exported program has (graph JSON, raw
weights and constants, sample inputs, extra files), payload configs that pickle nothing, tensor
user inputs, node targets that are ATen/prims operators or symbolic-shape helpers, and shape
expressions and guards within the grammar of ``worker.support.sym_expr``.
"""

from __future__ import annotations

import json
import re

from shared.errors import UserInputError
from worker.support.pickle_scan import archive_root, pickle_imports
from worker.support.sym_expr import ExpressionError, parse_guard, parse_shape_expression
from worker.support.zip_check import CheckedZip, open_checked_zip

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
_SAMPLE_GLOBALS = {("collections", "OrderedDict")}  # besides torch's own, in honest sample inputs


def check_program(archive: CheckedZip, label: str) -> dict[str, bytes]:
    """Refuse a .pt2 archive torch.export.load could not read without running its contents.

    Returns the members to replace in the archive handed to the loader: the sample inputs,
    emptied (the conversion never needs them, and an empty member is not unpickled at all).
    """
    names = archive.names()
    root = archive_root(names, label)
    members = [name[len(root):] for name in names]
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
    replaced: dict[str, bytes] = {}
    for model in models:
        try:
            for config in (f"data/weights/{model}_weights_config.json",
                           f"data/constants/{model}_constants_config.json"):
                _check_payload_config(_read_json(archive, root + config, label), config, label)
            sample = root + f"data/sample_inputs/{model}.pt"
            if sample in archive:
                _check_sample_inputs(archive.read(sample), label)
                replaced[sample] = b""
            _check_graph(_read_json(archive, root + f"models/{model}.json", label), label)
        except (AttributeError, TypeError, KeyError, StopIteration, ValueError) as exc:
            raise UserInputError(f"{label}: the program's {model} files are malformed ({type(exc).__name__}: "
                                 f"{str(exc)[:100]})") from None
    return replaced


def _read_json(archive: CheckedZip, member: str, label: str):
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
    """Refuse sample inputs whose pickle imports anything but torch's tensor rebuilders.

    They are never unpickled (the loader gets them emptied); the scan is there to name a crafted
    file for what it is rather than convert it silently.
    """
    where = f"{label}: the sample inputs inside the archive"
    if not data:
        return
    with open_checked_zip(data, where, max_bytes=64 * len(data) + 2**20) as inner:
        pickles = [name for name in inner.names() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise UserInputError(f"{where} are not a torch.save file; refused as unsafe")
        for module, attr in pickle_imports(inner.read(pickles[0]), where):
            if module.split(".", 1)[0] != "torch" and (module, attr) not in _SAMPLE_GLOBALS:
                raise UserInputError(
                    f"{where} import {module}.{attr}: they are not plain tensors, and torch.export.load would "
                    "unpickle them with weights_only=False, so the program is refused as unsafe"
                )


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
        try:
            parse_guard(str(guard))
        except ExpressionError as exc:
            raise UserInputError(f"{label}: the program's guard {str(guard)[:80]!r} is not a shape check ({exc}); "
                                 "refused") from None
    expressions = list(model.get("range_constraints") or {})  # symbol names, or expressions like 2*s39
    for key, value in _walk(model):
        if key == "target" and isinstance(value, str) and not _safe_target(value):
            raise UserInputError(
                f"{label}: the graph calls {value[:100]!r}, which is not a torch operator; refused as unsafe"
            )
        if key == "expr_str":
            expressions.append(value)
    for text in expressions:
        try:
            parse_shape_expression(text if isinstance(text, str) else repr(text))
        except ExpressionError as exc:
            raise UserInputError(f"{label}: the shape expression {str(text)[:80]!r} is not a plain expression "
                                 f"({exc}); refused") from None


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
