"""``hf-transformers`` with ``task: text-generation``: a decoder-only model to an ONNX Runtime GenAI folder.

The fp32 export is the model builder's (``worker.support.genai_builder``). Its output folder is
the convert stage's model: ``model.onnx`` + ``model.onnx.data`` + ``genai_config.json`` + the
tokenizer files. Beside them the source folder is kept as ``hf_source/`` (``SOURCE_FOLDER``):
the int4 / int8 / fp16 variants are built from it by the same builder, which quantizes from the
source weights (not from the fp32 export), and its files are the blobs the job already uploaded,
so keeping it costs no storage. The deploy stage leaves it out of the served model.

Samples: the job's held-out text (``model.samples: file.txt``), else built-in English sentences,
tokenized by the folder's tokenizer *as saved* (special tokens as it adds them), each line
followed by the end-of-sequence token, packed end to end into ``convert.samples.batch`` rows of
``convert.samples.sequence`` tokens (the context length at most). The reference is the source
model's logits on those rows, computed in torch.

The conversion is checked here, against the source, per position: the export's next-token
choice (argmax) must agree with torch's at ``TOP1_MIN`` of the positions and the logits' cosine
must reach ``convert.tolerance.cosine_min``; the convert stage then checks the logits again
(cosine and max_abs) as it does for every model.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np

from shared.errors import UserInputError, one_line
from shared.inference.generation import (
    GENERATION_TASK,
    generation_fidelity,
    logits_name,
    read_genai_config,
    teacher_forced_feeds,
)
from worker.support.genai_builder import SOURCE_FOLDER, build, check_causal_lm_folder
from worker.support.plugin_io import ConvertRequest, ConvertResult
from worker.support.transformers_samples import SENTENCES

TOP1_MIN = 0.99  # the fp32 export picks torch's next token everywhere but at near-ties
MIN_ROW_TOKENS = 8


def convert_causal_lm(request: ConvertRequest) -> ConvertResult:
    import onnxruntime_genai
    import torch
    import transformers

    from shared.inference.runtime import load_session

    folder, source = Path(request.source), request.model.source
    architecture = check_causal_lm_folder(folder, source)
    workdir = Path(request.workdir)
    model_file = build(folder, workdir, precision="fp32", label=f"model.source {source}")
    config = read_genai_config(workdir)
    tokenizer = _tokenizer(folder, source)
    context = int(config["model"].get("context_length") or request.convert.samples.sequence)
    lines = request.sample_text if request.sample_text is not None else SENTENCES
    origin = "user-text" if request.sample_text is not None else "sentences"
    ids = token_rows(tokenizer, lines, rows=request.convert.samples.batch,
                     sequence=min(request.convert.samples.sequence, context),
                     origin=f"model.samples {request.model.samples}" if request.sample_text is not None else "samples")
    reference = _torch_logits(folder, ids, source)  # the torch model is gone before ONNX Runtime loads
    samples = teacher_forced_feeds(ids, config)
    session = load_session(model_file, threads=request.settings.bench_threads)
    actual = session.run(samples)[logits_name(config)]
    check = generation_fidelity(reference, actual, ids)
    cosine_min = request.convert.tolerance.cosine_min
    if check["next_token_agreement"] < TOP1_MIN or check["logits_cosine_min"] < cosine_min:
        raise UserInputError(
            f"conversion changed the model's predictions: the ONNX export picks torch's next token at "
            f"{check['next_token_agreement']:.4f} of {check['positions']} positions (needs {TOP1_MIN}) with logits "
            f"cosine_min {check['logits_cosine_min']:.5f} (tolerance {cosine_min})"
        )
    _keep_source(folder, workdir / SOURCE_FOLDER)
    return ConvertResult(
        model_file=model_file.name,
        samples=samples,
        reference={logits_name(config): reference},
        inputs=list(session.inputs),
        outputs=[info for info in session.outputs if info.name == logits_name(config)],
        extra={
            "task": GENERATION_TASK,
            "architecture": architecture,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime_genai": onnxruntime_genai.__version__,
            "context_length": context,
            "source_check": check,
            "samples": origin,
        },
    )


def token_rows(tokenizer, lines: list[str], *, rows: int, sequence: int, origin: str) -> np.ndarray:
    """Lines tokenized as the tokenizer frames them, each ended by EOS, packed into up to ``rows`` full rows.

    Text for fewer than one full row gives one shorter row (at least ``MIN_ROW_TOKENS`` tokens).
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for line in lines:
        tokens = list(tokenizer(line)["input_ids"]) if line.strip() else []
        if tokens and eos is not None and tokens[-1] != eos:
            tokens.append(eos)
        stream.extend(tokens)
        if len(stream) >= rows * sequence:
            break
    if len(stream) < min(sequence, MIN_ROW_TOKENS):
        raise UserInputError(f"{origin}: {len(stream)} tokens in all; the gate needs at least {MIN_ROW_TOKENS}")
    if len(stream) < sequence:
        return np.asarray([stream], dtype=np.int64)
    count = min(rows, len(stream) // sequence)
    return np.asarray(stream[: count * sequence], dtype=np.int64).reshape(count, sequence)


def _tokenizer(folder: Path, source: str):
    from transformers import AutoTokenizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise UserInputError(f"model.source {source}: the tokenizer cannot be loaded: {one_line(exc)}") from None


def _torch_logits(folder: Path, ids: np.ndarray, source: str) -> np.ndarray:
    """The source model's logits on the rows, float32, one row at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    from worker.support.transformers_models import quiet

    try:
        with quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, trust_remote_code=False,
                dtype=torch.float32, attn_implementation="eager").eval()
    except Exception as exc:
        raise UserInputError(f"model.source {source}: transformers cannot load the model: {one_line(exc)}") from None
    try:
        with torch.inference_mode():
            return np.stack([model(input_ids=torch.from_numpy(row[None])).logits[0].float().numpy()
                             for row in ids])
    except (RuntimeError, IndexError, ValueError) as exc:
        raise UserInputError(f"model.source {source}: the model fails on the sample text: {one_line(exc)}") from None
    finally:
        del model


def _keep_source(folder: Path, target: Path) -> None:
    """Copy the source folder's plain files (recursively) for the variants to rebuild from."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            destination = target / path.relative_to(folder)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)

