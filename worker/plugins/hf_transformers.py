"""Hugging Face transformers model folder -> ONNX (TorchScript exporter, eager attention).

The folder must hold ``config.json`` and safetensors weights; pickle weights
(``pytorch_model.bin``) are refused because loading them can run arbitrary code
(``worker.support.transformers_models``).

Tasks: ``feature-extraction`` exports the token states (``last_hidden_state``),
``sentence-embedding`` one vector per row (``sentence_embedding``: what sentence-transformers'
``encode`` returns, with the pooling and normalization of the folder's ``modules.json`` and
``1_Pooling/config.json``; mean pooling and no normalization without them), and
``text-classification`` the ``logits``; ``text-generation`` (decoder-only language models) goes
to ONNX Runtime GenAI's model builder instead (``worker.support.genai_convert``): a model folder
with a KV cache, checked against torch's logits per position.

Sample inputs (``worker.support.transformers_samples``): the job's text (``model.samples:
file.txt``, one example per line) or token-id arrays, else rows of real English sentences when
the folder has a tokenizer, else random token ids.
"""

from __future__ import annotations

from pathlib import Path

from shared.errors import UserInputError, one_line
from shared.inference.generation import GENERATION_TASK
from worker.plugins.base import Converter, ConvertRequest, ConvertResult, TensorInfo
from worker.support.genai_convert import convert_causal_lm
from worker.support.onnx_files import set_metadata
from worker.support.sentence_pooling import pooling_of
from worker.support.transformers_export import export_onnx, task_module
from worker.support.transformers_models import TASKS, check_folder, input_names, load_model, task_of
from worker.support.transformers_samples import sample_inputs


class HFTransformers(Converter):
    name = "hf-transformers"
    targets = ("onnx",)
    source_is_folder = True
    text_samples = True
    prune_methods = ("layers", "heads", "ffn-neurons")
    tools = ("onnx", "onnxruntime", "onnxruntime-genai")  # the last: text-generation's model builder

    def convert(self, request: ConvertRequest) -> ConvertResult:
        import torch
        import transformers

        if request.model.task == GENERATION_TASK:
            return convert_causal_lm(request)
        folder = Path(request.source)
        task = task_of(request.model.task, folder)
        check_folder(folder, request.model.source)
        output_name = TASKS[task][1]
        model = load_model(folder, task, request.model.source)
        config = model.config

        names = input_names(model)
        if "input_ids" not in names:
            raise UserInputError(
                f"model.source {request.model.source}: {type(model).__name__} does not take input_ids; "
                "hf-transformers supports text models only"
            )
        samples, origin = sample_inputs(request, folder, config, names, task)

        pooling = pooling_of(folder, request.model.source) if task == "sentence-embedding" else None
        module = task_module(model, names, task, pooling)
        args = tuple(torch.from_numpy(samples[name]) for name in names)
        try:
            with torch.inference_mode():
                out = module(*args)
        except (RuntimeError, IndexError, ValueError) as exc:
            message = one_line(exc)
            raise UserInputError(
                f"model.source {request.model.source}: the model fails on the sample inputs "
                f"{list(samples['input_ids'].shape)}: {message}"
            ) from None
        reference = {output_name: out.detach().float().numpy().copy()}

        dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in names}
        if task == "feature-extraction":
            dynamic_axes[output_name] = {0: "batch", 1: "sequence"}
            out_shape: list[int | str] = ["batch", "sequence", int(reference[output_name].shape[-1])]
        else:
            dynamic_axes[output_name] = {0: "batch"}
            out_shape = ["batch", int(reference[output_name].shape[-1])]

        model_file = export_onnx(module, args, request.workdir, names, output_name, dynamic_axes,
                                 request.convert.opset)
        facts = {
            "modelyard.source_format": self.name,
            "modelyard.task": task,
            "modelyard.model_type": str(getattr(config, "model_type", "")),
            # read by the graph optimizer: its attention fusion cannot detect these from the eager export
            "modelyard.num_attention_heads": str(getattr(config, "num_attention_heads", "") or ""),
            "modelyard.hidden_size": str(getattr(config, "hidden_size", "") or ""),
        }
        set_metadata(Path(request.workdir) / model_file, {key: value for key, value in facts.items() if value})
        return ConvertResult(
            model_file=model_file,
            samples=samples,
            reference=reference,
            inputs=[TensorInfo(name, "int64", ["batch", "sequence"]) for name in names],
            outputs=[TensorInfo(output_name, "float32", out_shape)],
            extra={
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "task": task,
                "architecture": type(model).__name__,
                "attn_implementation": "eager",
                "samples": origin,
            },
        )
