"""Offline graph optimization: operator fusion, constant folding, redundant node removal.

A BERT-like graph (Softmax attention, layer norms, MatMuls) goes through ONNX Runtime's
transformer optimizer (``onnxruntime.transformers.optimizer.optimize_model``, model type
"bert", heads and hidden size detected from the graph), which fuses attention, layer norm,
GELU and embedding subgraphs into ``com.microsoft`` contrib ops. Any other graph is optimized
by ONNX Runtime itself at ``ORT_ENABLE_EXTENDED`` and saved with ``optimized_model_filepath``.

Either output runs on ONNX Runtime only (contrib ops are not standard ONNX).

Parameters: ``Graph.params``. ``num_heads`` / ``hidden_size`` 0 take what the hf-transformers
converter recorded in the model's metadata, else ONNX Runtime detects them from the graph.
"""

from __future__ import annotations

from pathlib import Path

from shared.errors import UserInputError, one_line
from worker.plugins.base import Optimizer, OptimizeRequest, Param
from worker.support.onnx_files import metadata


def looks_like_bert(model_path: Path) -> bool:
    """Softmax attention with layer norms over MatMuls: what the bert fusions recognize."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    ops = {node.op_type for node in proto.graph.node}
    norms = "LayerNormalization" in ops or {"ReduceMean", "Sqrt", "Div"} <= ops
    return "Softmax" in ops and "MatMul" in ops and norms


def _attention_shape(model_path: Path) -> tuple[int, int]:
    """(num_heads, hidden_size) recorded by the hf-transformers converter; (0, 0) = let ORT detect."""
    props = metadata(model_path)
    try:
        return int(props.get("modelyard.num_attention_heads", 0)), int(props.get("modelyard.hidden_size", 0))
    except ValueError:
        return 0, 0


class Graph(Optimizer):
    name = "graph"
    applies_to = ("onnx",)
    params = {
        "model_type": Param(str, "auto", "bert: the transformer optimizer; generic: ONNX Runtime's own; "
                                         "auto: bert for BERT-like graphs", choices=("auto", "bert", "generic")),
        "num_heads": Param(int, 0, "attention heads, for the transformer optimizer (0: recorded or detected)", min=0),
        "hidden_size": Param(int, 0, "hidden size, for the transformer optimizer (0: recorded or detected)", min=0),
    }

    def optimize(self, request: OptimizeRequest) -> Path:
        from shared.inference.runtime import check_loads

        model_type = request.params["model_type"]
        source = Path(request.model).absolute()
        output = Path(request.workdir).absolute() / "model.onnx"
        if model_type == "bert" or (model_type == "auto" and looks_like_bert(source)):
            heads, hidden = _attention_shape(source)
            heads = request.params["num_heads"] or heads
            hidden = request.params["hidden_size"] or hidden
            try:
                self._transformer(source, output, heads, hidden)
            except Exception as exc:
                if model_type == "bert":
                    message = one_line(exc)
                    raise UserInputError(
                        f"optimize variant graph: the transformer optimizer failed on {source.name}: {message}"
                    ) from None
                self._generic(source, output)
        else:
            self._generic(source, output)
        check_loads(output, self.name)
        return output

    @staticmethod
    def _transformer(source: Path, output: Path, num_heads: int, hidden_size: int) -> None:
        from onnxruntime.transformers.optimizer import optimize_model

        from shared.inference.runtime import save_onnx

        # Its loggers are named after bare module names ("fusion_attention", ...): the package puts
        # its folder on sys.path. With heads/hidden size known they stay quiet on BERT graphs.
        optimized = optimize_model(
            str(source), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, use_gpu=False
        )
        optimized.topological_sort()
        proto = optimized.model
        if any(n.domain == "com.microsoft" for n in proto.graph.node) and not any(
            o.domain == "com.microsoft" for o in proto.opset_import
        ):
            proto.opset_import.add(domain="com.microsoft", version=1)
        save_onnx(proto, output)

    @staticmethod
    def _generic(source: Path, output: Path) -> None:
        import onnxruntime as ort

        from shared.inference.runtime import PROTO_LIMIT, model_bytes

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(output)
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        data = output.with_name(output.name + ".data")
        output.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
        if model_bytes(source) > PROTO_LIMIT:
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data.name)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            message = one_line(exc)
            raise UserInputError(
                f"optimize variant graph: ONNX Runtime cannot optimize {source.name}: {message}") from None
