"""Structured pruning of Hugging Face BERT-style encoders into a smaller architecture.

Supported: models whose encoder is ``<base>.encoder.layer`` of BERT-style layers
(``attention.self.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense``,
``output.dense``): BERT, MiniLM, RoBERTa, ELECTRA and the like. The result is saved with
``save_pretrained`` (config + safetensors) and loads with the stock classes: nothing is masked.

Rules, measured on *probe* rows from the job's data (the first rows of the distillation set):

* ``layers`` keep k: greedy by importance. Starting from all layers, repeatedly drop the layer
  whose removal leaves the model's output closest to the unpruned output (mean per-vector
  cosine on the probe) until k remain. Without probe data: evenly spaced, first and last kept
  (``round(i · (n-1) / (k-1))``).
* ``ffn-neurons`` keep k (or a ratio) per layer: neuron i's importance is its mean absolute
  activation on the probe times the L2 norm of its output weights (how much it writes into the
  residual stream); the top k per layer are kept, in their original order. ``intermediate_size``
  becomes k for every layer.
* ``heads`` keep k (or a ratio) per layer: head importance is the mean L2 norm of what the head
  writes through the attention output projection on the probe. transformers 5 removed
  ``prune_heads`` and its BERT config cannot describe fewer heads than ``hidden_size /
  head size``, so with transformers >= 5 this method is refused with a message saying so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from shared.arrays import Arrays
from shared.errors import UserInputError
from worker.support.transformers_models import input_names  # noqa: F401 - part of this module's interface

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")


def load(folder: Path, task: str | None, source: str):
    """The model in folder, float32, eager attention, in eval mode (UserInputError if it cannot load)."""
    from worker.support.transformers_models import check_folder, load_model

    check_folder(folder, source)
    return load_model(folder, task, source)


def objective(task: str | None) -> str:
    return "logits" if task == "text-classification" else "embedding"


def forward_fn(task: str | None, pooling: dict | None = None):
    """``forward(model, batch)``: the output the task exports, which distillation matches.

    ``pooling`` (``worker.support.sentence_pooling.pooling_of``) for task sentence-embedding.
    """
    from worker.support.transformers_models import task_output

    def forward(model, batch: dict):
        return task_output(model, batch, task, pooling)

    return forward


def mask_fn(task: str | None):
    """The positions that count in forward's output: the real tokens of token states; None for one vector per row."""
    if task in ("text-classification", "sentence-embedding"):
        return None
    return lambda batch: batch["attention_mask"]


def encoder_layers(model):
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None or not len(layers) or not all(_is_bert_layer(layer) for layer in layers):
        raise UserInputError(
            f"compress.prune: {type(model).__name__} is not a BERT-style encoder (encoder.layer of layers with "
            "attention.self, intermediate and output); pruning supports BERT, MiniLM, RoBERTa, ELECTRA and alike"
        )
    return encoder, layers


def _is_bert_layer(layer) -> bool:
    return all(hasattr(layer, name) for name in ("attention", "intermediate", "output")) and hasattr(
        layer.attention, "self"
    )


def encoder_parameters(model) -> int:
    encoder, _ = encoder_layers(model)
    return sum(p.numel() for p in encoder.parameters())


def count(keep: float, total: int, what: str) -> int:
    kept = keep if isinstance(keep, int) else max(1, round(keep * total))
    if kept > total:
        raise UserInputError(f"compress.prune.keep {keep}: the model has only {total} {what}")
    return kept


# -- data ----------------------------------------------------------------------------------

def tokenizer_of(folder: Path, source: str):
    from worker.support.transformers_samples import load_tokenizer

    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise UserInputError(f"model.source {source}: distilling a text model needs its tokenizer in the folder")
    return tokenizer


# -- pruning -------------------------------------------------------------------------------

def prune(model, method: str, keep: float, probe: Arrays | None, task: str | None,
          pooling: dict | None = None) -> dict:
    """Prune model in place into a smaller architecture; returns what was kept."""
    if method == "layers":
        return _prune_layers(model, keep, probe, task, pooling)
    if method == "ffn-neurons":
        return _prune_ffn(model, keep, probe)
    if method == "heads":
        return _prune_heads(model, keep, probe)
    raise UserInputError(f"compress.prune.method {method!r} does not apply to hf-transformers models")


def _tensors(arrays: Arrays):
    import torch

    return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}


def set_layers(model, layers) -> None:
    import torch

    encoder, _ = encoder_layers(model)
    encoder.layer = torch.nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)


def _prune_layers(model, keep: float, probe: Arrays | None, task: str | None, pooling: dict | None) -> dict:
    import torch

    from shared.inference.fidelity import cosines

    _, layers = encoder_layers(model)
    layers = list(layers)
    total = len(layers)
    k = count(keep, total, "layers")
    if probe is None:
        kept = sorted({round(i * (total - 1) / (k - 1)) for i in range(k)}) if k > 1 else [total - 1]
        set_layers(model, [layers[i] for i in kept])
        return {"kept_layers": kept, "rule": "evenly spaced"}
    forward, mask_of = forward_fn(task, pooling), mask_fn(task)
    batch = _tensors(probe)
    keep_mask = mask_of(batch).numpy().reshape(-1).astype(bool) if mask_of else None

    def score(indices: list[int]) -> float:
        set_layers(model, [layers[i] for i in indices])
        with torch.no_grad():
            out = forward(model, batch).float().numpy()
        values = cosines(reference, out)
        return float(values[keep_mask].mean() if keep_mask is not None else values.mean())

    with torch.no_grad():
        reference = forward(model, batch).float().numpy()
    kept = list(range(total))
    dropped = []
    while len(kept) > k:
        scores = {i: score([j for j in kept if j != i]) for i in kept}
        worst = max(scores, key=lambda i: (scores[i], i))  # least missed; ties drop the later layer
        kept.remove(worst)
        dropped.append({"layer": worst, "cosine_without": round(scores[worst], 5)})
    set_layers(model, [layers[i] for i in kept])
    return {"kept_layers": kept, "rule": "greedy by output cosine on the probe", "dropped": dropped}


def _activation_means(model, probe: Arrays, modules) -> list:
    """Mean absolute output of each module (per output channel) over the probe's real tokens."""
    import torch

    sums: list = [None] * len(modules)
    batch = _tensors(probe)
    mask = batch.get("attention_mask")

    def hook(index):
        def record(_module, _inputs, output):
            values = output.detach().abs()
            if mask is not None and values.dim() == 3:
                values = values * mask.unsqueeze(-1).to(values.dtype)
                sums[index] = values.sum(dim=(0, 1)) / mask.sum().clamp_min(1)
            else:
                sums[index] = values.reshape(-1, values.shape[-1]).mean(0)
        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def _linear(weight, bias):
    import torch

    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _prune_ffn(model, keep: float, probe: Arrays | None) -> dict:
    import torch

    _, layers = encoder_layers(model)
    total = layers[0].intermediate.dense.out_features
    k = count(keep, total, "FFN neurons per layer")
    activations = _activation_means(model, probe, [layer.intermediate for layer in layers]) if probe else None
    kept_all = []
    for index, layer in enumerate(layers):
        up, down = layer.intermediate.dense, layer.output.dense
        writes = down.weight.detach().norm(dim=0)
        reads = activations[index] if activations else up.weight.detach().norm(dim=1)
        kept = torch.sort(torch.topk(reads * writes, k).indices).values
        layer.intermediate.dense = _linear(up.weight.detach()[kept], up.bias.detach()[kept] if up.bias is not None
                                           else None)
        layer.output.dense = _linear(down.weight.detach()[:, kept], down.bias.detach() if down.bias is not None
                                     else None)
        kept_all.append(len(kept))
    model.config.intermediate_size = k
    return {"ffn_neurons_per_layer": k, "of": total,
            "rule": "activation x output-weight norm on the probe" if probe else "weight norms"}


def _prune_heads(model, keep: float, probe: Arrays | None) -> dict:
    import transformers

    if not hasattr(model, "prune_heads"):
        raise UserInputError(
            f"compress.prune.method heads: transformers {transformers.__version__} has no head pruning "
            "(prune_heads was removed in 5.0) and a BERT config cannot describe layers with fewer heads; "
            "use method layers or ffn-neurons"
        )
    import torch

    _, layers = encoder_layers(model)
    heads = model.config.num_attention_heads
    size = model.config.hidden_size // heads
    k = count(keep, heads, "attention heads per layer")
    contexts = _activation_means(model, probe, [layer.attention.self for layer in layers]) if probe else None
    remove = {}
    for index, layer in enumerate(layers):
        out = layer.attention.output.dense.weight.detach()
        scores = []
        for h in range(heads):
            writes = out[:, h * size:(h + 1) * size].norm()
            reads = contexts[index][h * size:(h + 1) * size].norm() if contexts else 1.0
            scores.append(float(writes * reads))
        ranked = torch.argsort(torch.tensor(scores), descending=True).tolist()
        remove[index] = sorted(ranked[k:])
    model.prune_heads(remove)
    return {"heads_per_layer": k, "of": heads, "removed": remove}


def save(model, teacher_folder: Path, out: Path) -> None:
    """config + safetensors from the student; tokenizer and other non-weight files from the teacher."""
    out.mkdir(parents=True, exist_ok=True)
    for path in Path(teacher_folder).iterdir():
        if path.is_file() and path.suffix.lower() not in WEIGHT_SUFFIXES and path.name != "config.json":
            shutil.copy2(path, out / path.name)
        elif path.is_dir() and not path.is_symlink():  # e.g. sentence-transformers' 1_Pooling
            shutil.copytree(path, out / path.name, dirs_exist_ok=True, symlinks=False,
                            ignore=lambda _dir, names: [n for n in names if n.lower().endswith(WEIGHT_SUFFIXES)])
    from worker.support.transformers_models import quiet

    with quiet():
        model.save_pretrained(str(out), safe_serialization=True)
