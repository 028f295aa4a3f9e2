"""Hugging Face transformers model folder -> ONNX (TorchScript exporter, eager attention).

The folder must hold ``config.json`` and safetensors weights; pickle weights
(``pytorch_model.bin``) are refused because loading them can run arbitrary code.

Attention is loaded as ``attn_implementation="eager"``: exporting the default SDPA attention
with ``dynamo=False`` gives a ``Where``-masked graph that dynamic INT8 runs ~25% slower.

Tasks: ``feature-extraction`` exports the token states (``last_hidden_state``),
``sentence-embedding`` one vector per row (``sentence_embedding``: what sentence-transformers'
``encode`` returns, with the pooling and normalization of the folder's ``modules.json`` and
``1_Pooling/config.json``; mean pooling and no normalization without them), and
``text-classification`` the ``logits``.

Sample inputs given as text (``model.samples: file.txt``, one example per line): for
``feature-extraction`` the lines are packed into rows of exactly ``sequence`` tokens as below;
for the pooled tasks each line is one row, padded to the longest (the graph masks padding).

Sample inputs when the job gives none: if the folder has a tokenizer, rows of real English
text with no padding (each row is sentences concatenated to exactly ``sequence`` tokens,
framed by the tokenizer's special tokens), so the attention mask is all ones and every
position the fidelity check compares is a real token; otherwise random token ids drawn
with ``convert.samples.seed``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import shutil
import warnings
from pathlib import Path

import numpy as np

from shared.errors import UserInputError
from worker.plugins.base import Arrays, Converter, ConvertRequest, ConvertResult, TensorInfo

TASKS = {
    "feature-extraction": ("AutoModel", "last_hidden_state"),
    "sentence-embedding": ("AutoModel", "sentence_embedding"),
    "text-classification": ("AutoModelForSequenceClassification", "logits"),
}
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.bin")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "Interest rates rose for the third consecutive quarter, surprising most analysts.",
    "She planted tomatoes, basil and marigolds along the south-facing fence.",
    "How do I reset my password if I no longer have access to my email?",
    "The orchestra tuned their instruments while the audience found their seats.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Our flight was delayed by four hours because of a storm over Chicago.",
    "He apologized for the misunderstanding and offered to pay for the damage.",
    "The new smartphone has a larger battery but a slightly heavier frame.",
    "Mix the flour and butter until the dough resembles coarse breadcrumbs.",
    "The committee will publish its final report on the bridge collapse next month.",
    "Volcanic ash can disrupt air travel across an entire continent for days.",
    "I absolutely loved the ending, even though it made me cry.",
    "This product broke after two days and customer support never replied.",
    "The database migration failed halfway, so we rolled back to the previous version.",
    "Children learn languages faster when they are immersed in them early.",
    "The museum's new exhibit features pottery from the Ming dynasty.",
    "Please submit the signed contract no later than Friday at noon.",
    "A sudden gust of wind scattered the papers across the courtyard.",
    "The striker scored twice in the final ten minutes to win the match.",
    "Electric vehicles still face challenges with charging infrastructure in rural areas.",
    "My grandmother kept every letter my grandfather wrote to her during the war.",
    "The algorithm sorts the list in linear time when the keys are small integers.",
    "Heavy rainfall is expected along the coast throughout the weekend.",
    "Could you recommend a quiet restaurant that serves vegetarian food?",
    "The senator denied the allegations and called for an independent inquiry.",
    "Whales communicate over vast distances using low-frequency songs.",
    "The hotel room was clean, but the walls were paper thin.",
    "After years of research, the team finally identified the gene responsible.",
    "Traffic on the highway came to a standstill after a truck overturned.",
    "The painting sold at auction for three times its estimated value.",
    "Regular exercise lowers the risk of heart disease and improves sleep.",
    "The startup raised twelve million dollars to expand into European markets.",
    "Nobody expected the quiet librarian to win the national chess championship.",
    "Turn left at the second traffic light and the pharmacy is on your right.",
    "The court ruled that the contract was void because it was signed under duress.",
    "Glaciers in the Alps have lost more than half their volume since 1900.",
    "I can't believe how slow the checkout process is on this website!",
    "The recipe calls for two cups of sugar, but I usually use less.",
    "Astronomers detected water vapor in the atmosphere of a distant exoplanet.",
    "Wait, did you remember to lock the back door before we left?",
    "The factory will cut three hundred jobs as demand for coal declines.",
]


class HFTransformers(Converter):
    name = "hf-transformers"
    targets = ("onnx",)
    source_is_folder = True

    def convert(self, request: ConvertRequest) -> ConvertResult:
        import torch
        import transformers

        folder = Path(request.source)
        task = _task(request, folder)
        _check_folder(folder, request.model.source)
        auto_name, output_name = TASKS[task]
        model = _load_model(folder, getattr(transformers, auto_name), request.model.source)
        config = model.config

        accepted = set(inspect.signature(model.forward).parameters)
        input_names = [name for name in INPUT_ORDER if name in accepted]
        if "input_ids" not in input_names:
            raise UserInputError(
                f"model.source {request.model.source}: {type(model).__name__} does not take input_ids; "
                "hf-transformers supports text models only"
            )
        samples, origin = _samples(request, folder, config, input_names, task)

        wrapper = _wrap(model, input_names, task, pooling_of(folder, request.model.source)
                        if task == "sentence-embedding" else None)
        args = tuple(torch.from_numpy(samples[name]) for name in input_names)
        try:
            with torch.inference_mode():
                out = wrapper(*args)
        except (RuntimeError, IndexError, ValueError) as exc:
            message = " ".join(str(exc).split())[:300]
            raise UserInputError(
                f"model.source {request.model.source}: the model fails on the sample inputs "
                f"{list(samples['input_ids'].shape)}: {message}"
            ) from None
        reference = {output_name: out.detach().float().numpy().copy()}

        dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
        if task == "feature-extraction":
            dynamic_axes[output_name] = {0: "batch", 1: "sequence"}
            out_shape: list[int | str] = ["batch", "sequence", int(reference[output_name].shape[-1])]
        else:
            dynamic_axes[output_name] = {0: "batch"}
            out_shape = ["batch", int(reference[output_name].shape[-1])]

        model_file = _export(
            wrapper, args, request.workdir, input_names, output_name, dynamic_axes, request.convert.opset
        )
        _add_metadata(
            Path(request.workdir) / model_file,
            {
                "modelyard.source_format": self.name,
                "modelyard.task": task,
                "modelyard.model_type": str(getattr(config, "model_type", "")),
                # read by the graph optimizer: its attention fusion cannot detect these from the eager export
                "modelyard.num_attention_heads": str(getattr(config, "num_attention_heads", "") or ""),
                "modelyard.hidden_size": str(getattr(config, "hidden_size", "") or ""),
            },
        )
        return ConvertResult(
            model_file=model_file,
            samples=samples,
            reference=reference,
            inputs=[TensorInfo(name, "int64", ["batch", "sequence"]) for name in input_names],
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


def _wrap(model, input_names: list[str], task: str, pooling: dict | None = None):
    """An nn.Module taking the inputs positionally and returning the one output tensor."""
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return task_output(self.model, dict(zip(input_names, tensors)), task, pooling)

    return Wrapper().eval()


def task_output(model, batch: dict, task: str | None, pooling: dict | None = None):
    """The one tensor a task exports (see TASKS); ``pooling`` (``pooling_of``) for sentence-embedding."""
    if task == "sentence-embedding":
        return pool(model(**batch, return_dict=True).last_hidden_state, batch.get("attention_mask"), pooling)
    return getattr(model(**batch, return_dict=True), TASKS[task or "feature-extraction"][1])


def pooling_of(folder: Path, source: str) -> dict:
    """How sentence-transformers turns this folder's token states into one vector: {mode, normalize}.

    Read from ``modules.json`` (a Normalize module) and the Pooling module's ``config.json``;
    a folder without them gets mean pooling and no normalization.
    """
    import json

    def read(path: Path):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserInputError(f"model.source {source}: {path.name} is not readable JSON ({exc})") from None

    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return {"mode": "mean", "normalize": False}
    modules = read(modules_file)
    if not isinstance(modules, list):
        raise UserInputError(f"model.source {source}: modules.json is not a list of modules")
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: str(m.get("path", "")) for m in modules if isinstance(m, dict)}
    extra = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if extra:
        raise UserInputError(f"model.source {source}: sentence-transformers module(s) {', '.join(extra)} are not "
                             "supported for task sentence-embedding (supported: Transformer, Pooling, Normalize)")
    mode = "mean"
    if "Pooling" in kinds:
        folder_path = (folder / kinds["Pooling"]).resolve()
        if not folder_path.is_relative_to(folder.resolve()):
            raise UserInputError(f"model.source {source}: modules.json's Pooling path leaves the model folder")
        config = read(folder_path / "config.json")
        modes = [name for key, name in POOLING_MODES.items() if config.get(key)]
        others = [key for key, value in config.items() if key.startswith("pooling_mode_") and value
                  and key not in POOLING_MODES]
        if len(modes) != 1 or others:
            raise UserInputError(f"model.source {source}: the Pooling module asks for {', '.join(modes + others) or 'no mode'};"
                                 f" task sentence-embedding supports exactly one of {', '.join(POOLING_MODES.values())}")
        mode = modes[0]
    return {"mode": mode, "normalize": "Normalize" in kinds}


def pool(hidden, mask, pooling: dict):
    """[batch, sequence, dim] token states -> [batch, dim], padding (mask 0) left out."""
    import torch

    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    if pooling["mode"] == "cls":
        vector = hidden[:, 0]
    elif pooling["mode"] == "max":
        vector = hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    else:
        vector = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)
    if pooling["normalize"]:
        vector = torch.nn.functional.normalize(vector, p=2.0, dim=-1)
    return vector


def _task(request: ConvertRequest, folder: Path) -> str:
    task = request.model.task
    if task is None:
        import json

        try:
            architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError):
            architectures = []
        task = (
            "text-classification"
            if any(str(a).endswith("ForSequenceClassification") for a in architectures)
            else "feature-extraction"
        )
    if task not in TASKS:
        raise UserInputError(
            f"model.task {task!r} is not supported by format hf-transformers "
            f"(supported: {', '.join(TASKS)})"
        )
    return task


def _check_folder(folder: Path, source: str) -> None:
    if not folder.is_dir():
        raise UserInputError(f"model.source {source}: format hf-transformers needs a model folder, got a file")
    if not (folder / "config.json").is_file():
        raise UserInputError(f"model.source {source}: the folder has no config.json (is it a transformers model?)")
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted({p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern)})
    if pickles:
        raise UserInputError(
            f"model.source {source}: weights are in pickle format ({', '.join(pickles[:3])}); "
            "pickle files can run arbitrary code when loaded and are refused. "
            "Convert them to safetensors (e.g. model.save_pretrained(dir, safe_serialization=True)) and resubmit"
        )
    raise UserInputError(f"model.source {source}: the folder has no *.safetensors weights")


def _load_model(folder: Path, auto_class, source: str):
    import torch

    try:
        with quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = auto_class.from_pretrained(
                str(folder),
                local_files_only=True,
                use_safetensors=True,
                attn_implementation="eager",
                dtype=torch.float32,
                trust_remote_code=False,
            )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as exc:
        message = " ".join(str(exc).split())[:300]
        raise UserInputError(f"model.source {source}: transformers cannot load the model: {message}") from None
    return model.eval()


@contextlib.contextmanager
def quiet():
    """transformers' progress bars ("Loading weights", "Writing model shards") off: noise in a worker's log."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def _samples(request: ConvertRequest, folder: Path, config, input_names: list[str], task: str) -> tuple[Arrays, str]:
    spec = request.convert.samples
    limit = getattr(config, "max_position_embeddings", None)
    if request.sample_text is not None:
        return _text_samples(request, folder, input_names, task, min(spec.sequence, limit or spec.sequence))
    if request.samples is not None:
        origin = request.model.samples or "samples"
        samples = _user_samples(request.samples, input_names, config, origin)
        if isinstance(limit, int) and samples["input_ids"].shape[1] > limit:
            raise UserInputError(
                f"model.samples {origin}: sequence length {samples['input_ids'].shape[1]} exceeds the model's "
                f"max_position_embeddings {limit}"
            )
        return samples, "user"
    if isinstance(limit, int) and spec.sequence > limit:
        raise UserInputError(
            f"convert.samples.sequence {spec.sequence} exceeds the model's max_position_embeddings {limit}"
        )
    tokenizer = _tokenizer(folder)
    if tokenizer is not None:
        ids = _sentence_ids(tokenizer, spec.batch, spec.sequence)
        origin = "sentences"
    else:
        vocab = int(getattr(config, "vocab_size", 0) or 0)
        if vocab < 1:
            raise UserInputError(
                f"model.source {request.model.source}: no tokenizer and no vocab_size in config.json; "
                "give sample inputs with model.samples"
            )
        ids = np.random.default_rng(spec.seed).integers(0, vocab, size=(spec.batch, spec.sequence), dtype=np.int64)
        origin = "random-ids"
    return _complete({"input_ids": ids}, input_names), origin


def _text_samples(request: ConvertRequest, folder: Path, input_names: list[str], task: str,
                  sequence: int) -> tuple[Arrays, str]:
    origin = f"model.samples {request.model.samples or 'text'}"
    tokenizer = _tokenizer(folder)
    if tokenizer is None:
        raise UserInputError(f"{origin}: text samples need the model's tokenizer in the folder")
    if task == "feature-extraction":  # token states are compared position by position: no padding
        ids = packed_rows(tokenizer, request.sample_text, sequence, origin)
        return _complete({"input_ids": ids}, input_names), "user-text"
    return line_rows(tokenizer, request.sample_text, sequence, input_names, origin), "user-text"


def packed_rows(tokenizer, lines: list[str], sequence: int, origin: str) -> np.ndarray:
    """The lines' tokens end to end, cut into rows of exactly ``sequence``: [CLS] ... [SEP], no padding."""
    head, tail = _frame(tokenizer, sequence)
    body = sequence - len(head) - len(tail)
    stream: list[int] = []
    for line in lines:
        stream.extend(tokenizer.encode(line, add_special_tokens=False))
    rows = [head + stream[i:i + body] + tail for i in range(0, len(stream) - body + 1, body)]
    if not rows:
        raise UserInputError(f"{origin}: {len(stream)} tokens in all, fewer than one row of {sequence}; "
                             "give more text or a smaller sequence")
    return np.asarray(rows, dtype=np.int64)


def line_rows(tokenizer, lines: list[str], sequence: int, input_names: list[str], origin: str) -> Arrays:
    """One row per line: [CLS] line [SEP], cut at ``sequence`` tokens, padded to the longest row.

    A line is one example, as a sentence encoder or a classifier sees it in use; the attention
    mask marks the padding.
    """
    encoded = [ids for ids in tokenizer(lines, add_special_tokens=True, truncation=True,
                                        max_length=sequence)["input_ids"] if ids] if lines else []
    if not encoded:
        raise UserInputError(f"{origin}: no line has any tokens")
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(encoded), width), pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, tokens in enumerate(encoded):
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = 1
    return _complete({"input_ids": ids, "attention_mask": mask}, input_names)


def _frame(tokenizer, sequence: int) -> tuple[list[int], list[int]]:
    """The special tokens that open and close a row ([CLS] and [SEP] for BERT), if the row has room."""
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    head = [first] if first is not None and sequence >= 3 else []
    tail = [last] if last is not None and sequence >= 3 else []
    return head, tail


def _user_samples(samples: Arrays, input_names: list[str], config, origin: str) -> Arrays:
    unknown = [name for name in samples if name not in input_names]
    if unknown:
        raise UserInputError(
            f"model.samples {origin}: unknown input(s) {', '.join(unknown)} (the model takes: {', '.join(input_names)})"
        )
    if "input_ids" not in samples:
        raise UserInputError(f"model.samples {origin}: input_ids is required")
    ids = np.asarray(samples["input_ids"])
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise UserInputError(
            f"model.samples {origin}: input_ids must be a 2-D integer array [batch, sequence], "
            f"got {ids.dtype} {list(ids.shape)}"
        )
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise UserInputError(
            f"model.samples {origin}: input_ids must lie in [0, {vocab}), got [{ids.min()}, {ids.max()}]"
        )
    arrays = {}
    for name, value in samples.items():
        value = np.asarray(value)
        if value.shape != ids.shape:
            raise UserInputError(
                f"model.samples {origin}: {name} has shape {list(value.shape)}, input_ids has {list(ids.shape)}"
            )
        arrays[name] = value.astype(np.int64)
    return _complete(arrays, input_names)


def _complete(arrays: Arrays, input_names: list[str]) -> Arrays:
    """Add an all-ones attention mask and zero token types where the model takes them."""
    ids = arrays["input_ids"].astype(np.int64)
    result = {"input_ids": ids}
    if "attention_mask" in input_names:
        result["attention_mask"] = arrays.get("attention_mask", np.ones_like(ids))
    if "token_type_ids" in input_names:
        result["token_type_ids"] = arrays.get("token_type_ids", np.zeros_like(ids))
    return {name: np.ascontiguousarray(result[name], dtype=np.int64) for name in input_names}


def _tokenizer(folder: Path):
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")
    if not any((folder / name).is_file() for name in names):
        return None
    try:
        from transformers import AutoTokenizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - a broken tokenizer only means random ids instead
        return None


def _sentence_ids(tokenizer, batch: int, sequence: int) -> np.ndarray:
    """batch rows of exactly `sequence` real tokens: [CLS] sentence sentence ... [SEP], no padding."""
    encoded = [tokenizer.encode(text, add_special_tokens=False) for text in SENTENCES]
    encoded = [ids for ids in encoded if ids]
    head, tail = _frame(tokenizer, sequence)
    body = sequence - len(head) - len(tail)
    count = len(encoded)
    stride = max(1, count // max(batch, 1))
    while math.gcd(stride, count) != 1:  # coprime: the first `count` rows start at distinct sentences
        stride += 1
    rows = []
    for row in range(batch):
        tokens: list[int] = []
        i = row * stride
        while len(tokens) < body + row // count:
            tokens.extend(encoded[i % count])
            i += 1
        tokens = tokens[row // count :]  # rows past the list's length also shift by a token
        rows.append(head + tokens[:body] + tail)
    return np.asarray(rows, dtype=np.int64)


def _export(wrapper, args, workdir: Path, input_names, output_name, dynamic_axes, opset: int) -> str:
    """Export to workdir/model.onnx; a model over protobuf's 2 GiB cap gets model.onnx.data beside it."""
    import torch

    workdir = Path(workdir)
    staging = workdir / ".export"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    target = workdir / "model.onnx"
    try:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapper,
                    args,
                    str(staging / "model.onnx"),
                    input_names=list(input_names),
                    output_names=[output_name],
                    dynamic_axes=dynamic_axes,
                    opset_version=opset,
                    dynamo=False,
                    do_constant_folding=True,
                )
        except Exception as exc:  # noqa: BLE001
            message = " ".join(str(exc).split())[:300]
            raise UserInputError(f"the model could not be exported to ONNX (opset {opset}): {message}") from None
        from worker.runtime import PROTO_LIMIT

        files = [p for p in staging.iterdir() if p.name != "model.onnx"]
        params = sum(t.numel() * t.element_size() for t in wrapper.parameters())
        if not files and params < PROTO_LIMIT:
            (staging / "model.onnx").replace(target)
        else:
            # Over 2 GiB the TorchScript exporter writes one file per tensor; gather them into one.
            import onnx

            from worker.runtime import save_onnx

            save_onnx(onnx.load(str(staging / "model.onnx"), load_external_data=True), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return "model.onnx"


def _add_metadata(path: Path, values: dict[str, str]) -> None:
    """Record facts about the source in the ONNX file's metadata_props (weights left where they are)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    existing = {entry.key: entry for entry in proto.metadata_props}
    for key, value in values.items():
        if not value:
            continue
        if key in existing:
            existing[key].value = value
        else:
            proto.metadata_props.add(key=key, value=value)
    onnx.save_model(proto, str(path))
