"""Decoder-only language models from a Hugging Face folder to an ONNX Runtime GenAI model folder.

The export is ONNX Runtime GenAI's model builder (``python -m onnxruntime_genai.models.builder``),
the proven tool for it: it writes ``model.onnx`` with a KV cache (GroupQueryAttention),
``model.onnx.data`` (the weights), ``genai_config.json`` (what ``onnxruntime_genai.Model``
reads) and the tokenizer files, at fp32, fp16 or weight-only int4 / int8 (MatMulNBits,
block-wise). It runs as a subprocess: the builder imports torch and transformers, holds the
whole model in memory while it writes, and leaves nothing behind in the worker process.

Refused before the builder runs, each with a message naming the file and what is wrong:

* a folder whose ``config.json`` or ``tokenizer_config.json`` has ``auto_map``: the model or its
  tokenizer needs the repository's own Python code, and ``trust_remote_code`` is never enabled;
* an architecture outside ``ARCHITECTURES`` (the Llama, Mistral, Qwen2/3 and Phi families);
* a folder without tokenizer files, or without safetensors weights (pickle weights are refused
  as for every Hugging Face model: ``worker.support.transformers_models.check_folder``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from shared.errors import UserInputError, one_line
from shared.settings import Settings
from worker.support.transformers_models import check_folder

# config.json "architectures"[0] -> family, for the builder's exporters this project supports.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "PhiForCausalLM": "phi",
    "Phi3ForCausalLM": "phi3",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # one of them: what the GenAI tokenizer reads
GENAI_CONFIG = "genai_config.json"
MODEL_FILE = "model.onnx"
SOURCE_FOLDER = "hf_source"  # in the convert outputs: the source the variants are rebuilt from
PRECISIONS = ("fp32", "fp16", "int4", "int8")
PROVIDERS = ("cpu", "cuda")
BUILDER_TIMEOUT_S = 3 * 3600
# the packages whose versions key a step the builder ran (it imports torch and transformers to read the source)
BUILDER_TOOLS = ("onnxruntime-genai", "onnx-ir", "onnx", "onnxruntime", "torch", "transformers")


def read_config(folder: Path, source: str) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"model.source {source}: config.json cannot be read: {one_line(exc)}") from None
    if not isinstance(config, dict):
        raise UserInputError(f"model.source {source}: config.json is not a JSON object")
    return config


def check_causal_lm_folder(folder: Path, source: str) -> str:
    """The folder's architecture when the builder can export it; UserInputError naming the problem otherwise."""
    check_folder(folder, source)  # a folder, config.json, safetensors (never pickles)
    config = read_config(folder, source)
    tokenizer_config = _json_or_empty(folder / "tokenizer_config.json")
    for name, data in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
        if data.get("auto_map"):
            raise UserInputError(
                f"model.source {source}: {name} has 'auto_map': the model needs its repository's own Python code "
                "(trust_remote_code), which modelyard never runs; export a model whose architecture transformers "
                f"ships ({', '.join(ARCHITECTURES)})"
            )
    architectures = config.get("architectures") or []
    architecture = str(architectures[0]) if architectures else ""
    if architecture not in ARCHITECTURES:
        found = f"architecture {architecture!r}" if architecture else "no 'architectures' entry"
        raise UserInputError(
            f"model.source {source}: config.json names {found}; task text-generation supports decoder-only "
            f"models of the architectures {', '.join(ARCHITECTURES)}"
        )
    clash = _layer_width_equal_to_vocabulary(config)
    if clash:
        raise UserInputError(
            f"model.source {source}: vocab_size {config['vocab_size']} equals the output width of the layers' "
            f"{clash}; ONNX Runtime GenAI's model builder takes every linear layer with vocab_size outputs for the "
            "language-model head and would export a wrong model"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserInputError(
            f"model.source {source}: the folder has no tokenizer ({' or '.join(TOKENIZER_FILES)}); a text-generation "
            "model is served with its tokenizer: save it beside the model (tokenizer.save_pretrained(folder))"
        )
    return architecture


def _layer_width_equal_to_vocabulary(config: dict) -> str | None:
    """The projection whose output width is vocab_size, if one is (only toy vocabularies are this small)."""
    try:
        vocab, hidden, heads = int(config["vocab_size"]), int(config["hidden_size"]), int(config["num_attention_heads"])
        head = int(config.get("head_dim") or hidden // heads)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        intermediate = int(config.get("intermediate_size") or 0)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    widths = {"query projection": heads * head, "key/value projections": kv_heads * head,
              "MLP (intermediate_size)": intermediate, "output projections (hidden_size)": hidden}
    if (config.get("architectures") or [""])[0] == "Phi3ForCausalLM":  # Phi-3 fuses q/k/v and gate/up
        widths.update({"fused query/key/value projection": (heads + 2 * kv_heads) * head,
                       "fused gate/up projection": 2 * intermediate})
    return next((name for name, width in widths.items() if width == vocab), None)


def _json_or_empty(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def build(source: Path, output: Path, *, precision: str, provider: str = "cpu",
          options: Mapping[str, object] | None = None, label: str = "the model") -> Path:
    """Run the model builder on a checked folder into ``output``; returns the model file's path.

    ``options`` become the builder's ``--extra_options KEY=VALUE`` (booleans as true/false).
    The builder's scratch files (``cache_dir``) go to a temporary folder beside ``output``, never
    into it. UserInputError with the builder's last words when it fails.
    """
    if precision not in PRECISIONS or provider not in PROVIDERS:
        raise ValueError(f"unsupported builder target {precision}/{provider}")
    output.mkdir(parents=True, exist_ok=True)
    extra = {"hf_remote": False, "hf_token": False, **(options or {})}
    pairs = [f"{key}={_option(value)}" for key, value in extra.items()]
    with tempfile.TemporaryDirectory(prefix="genai-builder-", dir=output.parent) as scratch:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(output),
                   "-p", precision, "-e", provider, "-c", str(Path(scratch) / "cache"), "--extra_options", *pairs]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": scratch,
               "PYTHONWARNINGS": "ignore"}
        try:
            done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True,
                                  timeout=BUILDER_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise UserInputError(f"the ONNX Runtime GenAI model builder did not finish {label} within "
                                 f"{BUILDER_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise UserInputError(f"the ONNX Runtime GenAI model builder failed on {label} ({precision}, {provider}): "
                             f"{_complaint(done.stdout + done.stderr, done.returncode)}")
    model = output / MODEL_FILE
    if not model.is_file() or not (output / GENAI_CONFIG).is_file():
        raise UserInputError(f"the ONNX Runtime GenAI model builder wrote no {MODEL_FILE} and {GENAI_CONFIG} for "
                             f"{label} ({precision}, {provider})")
    return model


def _option(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _complaint(output: str, returncode: int) -> str:
    """The builder's error in one line: its last exception line, else its last line; a kill named as such."""
    if returncode < 0 or returncode == 137:
        return f"killed (signal {-returncode if returncode < 0 else 9}): out of memory or stopped"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0]]
    return one_line((errors or lines or [f"exit status {returncode}"])[-1])



def rebuild_variant(model: Path, workdir: Path, settings: Settings | None, *, variant: str, precision: str,
                    provider: str = "cpu", options: Mapping[str, object] | None = None) -> Path:
    """A text-generation variant: the builder run again, at ``precision``, on the source kept beside ``model``.

    ``model`` is the convert stage's ``model.onnx``; its folder holds ``genai_config.json`` and the
    source as ``hf_source/`` (``worker.support.genai_convert``). Anything else is refused by name.
    The builder reads the user's model: it runs in the model-load sandbox (the ``genai-build``
    task) unless ``settings`` (the environment's when None) turn the sandbox off.
    """
    from worker.sandbox.tasks import run_task

    folder = Path(model).parent
    source = folder / SOURCE_FOLDER
    if not (folder / GENAI_CONFIG).is_file() or not source.is_dir():
        raise UserInputError(f"variant {variant} applies to text-generation models (task text-generation: an ONNX "
                             f"Runtime GenAI folder and its source); {Path(model).name} is not one")
    params = {"precision": precision, "provider": provider, "options": dict(options or {}),
              "label": f"variant {variant}"}
    answer, _sandbox = run_task("genai-build", params, source=source, workdir=Path(workdir),
                                settings=settings or Settings())
    name = answer.get("model_file")
    if name != MODEL_FILE or not (Path(workdir) / MODEL_FILE).is_file() or not (Path(workdir) / GENAI_CONFIG).is_file():
        raise UserInputError(f"the ONNX Runtime GenAI model builder wrote no {MODEL_FILE} and {GENAI_CONFIG} for "
                             f"variant {variant} ({precision}, {provider})")
    return Path(workdir) / MODEL_FILE


def build_task(params: dict, source: Path, out: Path) -> dict:
    """The ``genai-build`` sandbox task (``worker.sandbox.tasks``): ``build`` with the request's parameters."""
    model = build(source, out, precision=params["precision"], provider=params["provider"],
                  options=params["options"], label=params["label"])
    return {"model_file": model.name}


def generation_companions(model: Path) -> list[Path]:
    """The files a GenAI model needs beside ``model.onnx`` and its weights: ``genai_config.json`` and the
    tokenizer files the builder copied (every other top-level file but sample arrays); none for another model."""
    folder = Path(model).parent
    if not (folder / GENAI_CONFIG).is_file():
        return []
    skip = {Path(model).name, Path(model).name + ".data"}
    return sorted(path for path in folder.iterdir()
                  if path.is_file() and path.name not in skip and path.suffix != ".npz")
