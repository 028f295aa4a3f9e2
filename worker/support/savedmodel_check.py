"""Everything in a SavedModel that TensorFlow could run at load, checked before TensorFlow sees it.

``tf.saved_model.load`` runs graph code while loading: a TF1-style SavedModel's init op (the
``__saved_model_init_op`` signature, the ``saved_model_main_op`` / ``legacy_init_op``
collections, else the local and table initializers) and its saver's restore op; a TF2 one its
resources' initializer functions. The signatures run on the first call. So a graph whose init op is
``WriteFile`` or ``SaveV2`` writes a file of its choosing inside the load (reproduced; a ``.pth``
file written under site-packages then runs on the next Python start). And the loader picks the
MetaGraph whose tag set *equals* the tags it is given, so a check that inspects another MetaGraph
(the first one *containing* ``serve``) passes a file whose loaded graph was never looked at.

``check_saved_model`` therefore looks at every MetaGraph, every node of its graph and every
function of its library, reachable or not, and refuses:

- operations that touch files, the network or Python anywhere (``DENIED_OPS``, ``DENIED_PATTERNS``);
- checkpoint writes (``SaveV2``, ``MergeV2Checkpoints``, ...) anywhere but the saver's own save
  path, and checkpoint reads (``RestoreV2``, ...) anywhere but its restore path, reading from the
  file name the loader feeds; neither reachable from an init op, a signature or an object's function;
- asset files outside the ``assets`` folder, missing, or reached through a symlink (any symlink in
  the folder is refused: a linked variables file would be read into the model);
- tag sets that do not pick exactly one MetaGraph for ``serve``.

It returns the exact tag set and signature to load: the loader is given those tags, so it loads the
MetaGraph that was chosen here (all of them passed the checks in any case). This is a deny-list
over an open set of operations: the model-load sandbox is the defence that holds when it misses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from shared.errors import UserInputError

SERVE = "serve"
DENIED_OPS = {
    "ReadFile", "WriteFile", "MatchingFiles", "ImmutableConst", "PrintV2",
    "PyFunc", "PyFuncStateless", "EagerPyFunc",
    "LoadAndRemapMatrix", "GenerateVocabRemapping", "InitializeTableFromTextFile", "InitializeTableFromTextFileV2",
    "DecodeProtoV2", "EncodeProto", "RemoteCall", "Send", "Recv", "_Send", "_Recv", "_HostSend", "_HostRecv",
    "MlirPassthroughOp",
}
# Readers, datasets and summary/debug writers touch files; RPC and collectives the network; XLA and
# TPU ops carry compiled code or host callbacks no converter here can use.
DENIED_PATTERNS = re.compile(r"Reader|Dataset|Summary|Debug|FileWriter|Rpc|Collective|^_?Xla|^_?TPU|PyFunc")
CHECKPOINT_WRITES = {"SaveV2", "Save", "SaveSlices", "MergeV2Checkpoints"}
CHECKPOINT_READS = {"RestoreV2", "Restore", "RestoreSlice"}
INIT_SIGNATURE = "__saved_model_init_op"
VARIABLE_COLLECTIONS = ("variables", "local_variables", "trainable_variables", "model_variables",
                        "metric_variables")


@dataclass(frozen=True)
class CheckedSavedModel:
    tags: list[str]  # the exact tag set of the MetaGraph to load
    signature: str  # the signature to serve


def check_saved_model(folder: Path, label: str) -> CheckedSavedModel:
    """Refuse a SavedModel that could run file, network or Python operations at load; what to load."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    _refuse_symlinks(folder, label)
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString((folder / "saved_model.pb").read_bytes())
    except DecodeError as exc:
        raise UserInputError(f"{label}: saved_model.pb is not a SavedModel protobuf: {exc}") from None
    if not saved.meta_graphs:
        raise UserInputError(f"{label}: the SavedModel has no MetaGraph")
    for index, graph in enumerate(saved.meta_graphs):
        where = f"{label}: MetaGraph {index} (tags {sorted(graph.meta_info_def.tags)})"
        _check_functions_unique(graph, where)
        _check_operations(graph, where)
        _check_assets(graph, folder, where)
    chosen = _choose_meta_graph(saved.meta_graphs, label)
    return CheckedSavedModel(tags=sorted(set(chosen.meta_info_def.tags)), signature=_signature_key(chosen, label))


def _refuse_symlinks(folder: Path, label: str) -> None:
    for path in folder.rglob("*"):
        if path.is_symlink():
            raise UserInputError(f"{label}: {path.relative_to(folder)} is a symbolic link; refused")


def _choose_meta_graph(graphs, label: str):
    """The one MetaGraph tagged exactly {serve}, else the only one whose tags include serve."""
    exact = [g for g in graphs if set(g.meta_info_def.tags) == {SERVE}]
    candidates = exact or [g for g in graphs if SERVE in g.meta_info_def.tags]
    if len(candidates) == 1:
        return candidates[0]
    tag_sets = ", ".join(str(sorted(g.meta_info_def.tags)) for g in graphs)
    if not candidates:
        raise UserInputError(f"{label}: the SavedModel has no MetaGraph tagged 'serve' (tag sets: {tag_sets})")
    raise UserInputError(
        f"{label}: {len(candidates)} MetaGraphs match the tag 'serve' (tag sets: {tag_sets}); which one "
        "TensorFlow loads depends on their order, so the SavedModel is ambiguous and refused. Keep one "
        "MetaGraph tagged exactly ['serve']"
    )


def _signature_key(graph, label: str) -> str:
    signatures = [k for k in graph.signature_def if not k.startswith("__")]
    if not signatures:
        raise UserInputError(f"{label}: the SavedModel has no signature to serve")
    if "serving_default" in signatures:
        return "serving_default"
    if len(signatures) == 1:
        return signatures[0]
    raise UserInputError(
        f"{label}: no 'serving_default' signature and several others ({', '.join(sorted(signatures))})")


def _check_functions_unique(graph, where: str) -> None:
    seen: set[str] = set()
    for function in graph.graph_def.library.function:
        if function.signature.name in seen:
            raise UserInputError(f"{where}: function {function.signature.name!r} is defined twice; refused")
        seen.add(function.signature.name)


def _check_operations(graph, where: str) -> None:
    functions = {f.signature.name: f for f in graph.graph_def.library.function}
    nodes = {n.name: n for n in graph.graph_def.node}
    saver = graph.saver_def
    filename = _node_name(saver.filename_tensor_name) if saver.filename_tensor_name else None
    save = _closure(nodes, functions, [saver.save_tensor_name] if saver.save_tensor_name else [])
    restore = _closure(nodes, functions, [saver.restore_op_name] if saver.restore_op_name else [])
    at_load = [(what, _closure(nodes, functions, roots, root_functions))
               for what, roots, root_functions in _load_roots(graph)]
    reads_from: dict[str, int] = {}  # function -> position of the file-name argument of its checkpoint reads
    for owner, node in _all_nodes(graph):
        place = f"function {owner!r}" if owner else f"node {node.name!r}"
        if node.op in DENIED_OPS or DENIED_PATTERNS.search(node.op):
            runner = next((what for what, reached in at_load if _contains(reached, owner, node)), None)
            used = f"{runner} runs operation {node.op!r} ({place})" if runner else f"{place} uses operation {node.op!r}"
            raise UserInputError(f"{where}: {used}, which reads or writes files, talks to the network or runs "
                                 "Python; SavedModels with such operations are refused")
        if node.op not in CHECKPOINT_WRITES | CHECKPOINT_READS:
            continue
        kind = "writes" if node.op in CHECKPOINT_WRITES else "reads"
        for what, reached in at_load + ([("the saver's restore op", restore)] if kind == "writes" else []):
            if _contains(reached, owner, node):
                raise UserInputError(f"{where}: {what} runs operation {node.op!r} ({kind} checkpoint files) when "
                                     "the model loads; refused")
        own_path = save if kind == "writes" else restore
        if not _contains(own_path, owner, node):
            raise UserInputError(f"{where}: {place} uses operation {node.op!r} ({kind} checkpoint files) outside "
                                 "the saver's own path; refused")
        if kind == "reads":
            prefix = _node_name(node.input[0]) if node.input else ""
            arguments = [a.name for a in functions[owner].signature.input_arg] if owner else []
            if owner and prefix in arguments:
                reads_from[owner] = arguments.index(prefix)
            elif owner or prefix != filename:
                raise UserInputError(f"{where}: {place} restores a checkpoint from another file than the one the "
                                     "loader names; refused")
    _check_restore_calls(graph, nodes, functions, reads_from, filename, where)


def _check_restore_calls(graph, nodes, functions, reads_from: dict[str, int], filename: str | None,
                         where: str) -> None:
    """A function that restores checkpoints is called only from the graph, with the loader's file name."""
    for owner, node in _all_nodes(graph):
        for called in set(_called(node, functions)) & set(reads_from):
            inputs = [i for i in node.input if not i.startswith("^")]
            position = reads_from[called]
            if owner or position >= len(inputs) or _node_name(inputs[position]) != filename:
                raise UserInputError(f"{where}: function {called!r} restores a checkpoint and is called with "
                                     "another file name than the one the loader names; refused")


def _load_roots(graph) -> list[tuple[str, list[str], list[str]]]:
    """(what, graph nodes, functions) that run when the model loads or serves, named for messages."""
    from tensorflow.core.framework import variable_pb2

    roots: list[tuple[str, list[str], list[str]]] = []
    for key, signature in graph.signature_def.items():
        what = "the init op (__saved_model_init_op)" if key == INIT_SIGNATURE else f"signature {key!r}"
        roots.append((what, [t.name for t in signature.outputs.values()], []))
    for key, collection in graph.collection_def.items():
        if collection.HasField("node_list"):
            what = f"the init op ({key})" if "init" in key or "main_op" in key else f"collection {key!r}"
            roots.append((what, list(collection.node_list.value), []))
        elif key in VARIABLE_COLLECTIONS:
            names = []
            for data in collection.bytes_list.value:
                variable = variable_pb2.VariableDef()
                variable.ParseFromString(data)
                names += [variable.initializer_name, variable.snapshot_name]
            roots.append((f"a variable initializer ({key})", [n for n in names if n], []))
    if graph.HasField("object_graph_def"):
        roots.append(("an object's function", [], list(graph.object_graph_def.concrete_functions)))
    return roots


def _check_assets(graph, folder: Path, where: str) -> None:
    assets = folder / "assets"
    for asset in graph.asset_file_def:
        name = asset.filename
        pure = PurePosixPath(name)
        if not name or "\\" in name or "\0" in name or pure.is_absolute() or ".." in pure.parts:
            raise UserInputError(f"{where}: asset file {name!r} is not a plain name inside assets/; refused")
        path = assets / name
        if not path.is_file() or not path.resolve().is_relative_to(assets.resolve()):
            raise UserInputError(f"{where}: asset file {name!r} is missing from assets/; refused")


# ---------------------------------------------------------------------------------------------
# Graph walking: nodes by name, functions by the attributes (or op names) that call them.

def _all_nodes(graph):
    for node in graph.graph_def.node:
        yield None, node
    for function in graph.graph_def.library.function:
        for node in function.node_def:
            yield function.signature.name, node


def _node_name(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


def _called(node, functions: dict) -> list[str]:
    names = [node.op] if node.op in functions else []
    for value in node.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        names.extend(f.name for f in value.list.func)
    return names


def _closure(nodes: dict, functions: dict, roots: list[str],
             root_functions: list[str] | None = None) -> tuple[set[str], set[str]]:
    """Graph nodes the roots depend on, and every function those nodes (or the root functions) call."""
    pending = [_node_name(r) for r in roots]
    calls = list(root_functions or [])
    seen_nodes: set[str] = set()
    seen_functions: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen_nodes or name not in nodes:
            continue
        seen_nodes.add(name)
        calls.extend(_called(nodes[name], functions))
        pending.extend(_node_name(i) for i in nodes[name].input)
    while calls:
        name = calls.pop()
        if name in seen_functions or name not in functions:
            continue
        seen_functions.add(name)
        for node in functions[name].node_def:
            calls.extend(_called(node, functions))
    return seen_nodes, seen_functions


def _contains(reached: tuple[set[str], set[str]], owner: str | None, node) -> bool:
    return owner in reached[1] if owner else node.name in reached[0]
