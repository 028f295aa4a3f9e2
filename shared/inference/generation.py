"""How a text-generation model scores held-out text, compared with its source model and with fp32.

A generation model (an ONNX Runtime GenAI folder: ``model.onnx`` with a KV cache, its weights,
``genai_config.json`` and the tokenizer) is measured *teacher-forced*: the held-out text goes in
as whole rows of token ids with an empty KV cache (``teacher_forced_feeds``), and the logits at
every position say what the model predicts next. From them, against the source model's logits on
the same rows (the convert stage's reference):

* ``perplexity``: exp of the mean negative log-likelihood of the actual next tokens;
* ``perplexity_source``: the same for the source model (torch), and ``perplexity_ratio_source``;
* ``next_token_agreement``: the share of positions where the greedy next token (the argmax) is
  the source model's;
* ``logits_cosine_min`` / ``logits_cosine_mean``: per-position cosine of the logits.

The gate (``gate_reasons``) compares perplexity with the fp32 export's (``perplexity_ratio_max``:
the variant's cost, not the exporter's) and next-token agreement with the source model
(``next_token_agreement_min``). Log-softmax runs one row at a time in float64, so a 150 k-token
vocabulary costs one row's worth of memory, not the batch's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import UserInputError, one_line
from shared.inference.fidelity import cosines
from shared.jobspec import Gate

GENERATION_TASK = "text-generation"
GENAI_CONFIG = "genai_config.json"


def is_generation_folder(folder: Path) -> bool:
    return (Path(folder) / GENAI_CONFIG).is_file()


def read_genai_config(folder: Path) -> dict[str, Any]:
    """The folder's genai_config.json; UserInputError when it is missing or unreadable."""
    try:
        config = json.loads((Path(folder) / GENAI_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{GENAI_CONFIG} of the generation model cannot be read: {one_line(exc)}") from None
    if not isinstance(config, dict) or "decoder" not in config.get("model", {}):
        raise UserInputError(f"{GENAI_CONFIG} has no model.decoder section: not an ONNX Runtime GenAI model")
    return config


def teacher_forced_feeds(input_ids: np.ndarray, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """The decoder's inputs for whole rows of token ids and an empty KV cache (past length 0).

    ``config`` is the folder's genai_config.json: it names the inputs and gives the cache's
    shape (``[batch, num_key_value_heads, 0, head_size]`` per layer, float32: ONNX Runtime casts
    nothing, so a float16 model's caller casts to the input's type).
    """
    decoder = config["model"]["decoder"]
    names = decoder.get("inputs", {})
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    batch, length = ids.shape
    feeds = {names.get("input_ids", "input_ids"): ids,
             names.get("attention_mask", "attention_mask"): np.ones_like(ids)}
    if "position_ids" in names:
        feeds[names["position_ids"]] = np.broadcast_to(np.arange(length, dtype=np.int64), ids.shape).copy()
    empty = np.zeros((batch, int(decoder["num_key_value_heads"]), 0, int(decoder["head_size"])), dtype=np.float32)
    for layer in range(int(decoder["num_hidden_layers"])):
        feeds[names.get("past_key_names", "past_key_values.%d.key") % layer] = empty
        feeds[names.get("past_value_names", "past_key_values.%d.value") % layer] = empty
    return feeds


def logits_name(config: dict[str, Any]) -> str:
    return config["model"]["decoder"].get("outputs", {}).get("logits", "logits")


def input_ids_name(config: dict[str, Any]) -> str:
    return config["model"]["decoder"].get("inputs", {}).get("input_ids", "input_ids")


def next_token_scores(logits: np.ndarray, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position but the last: the negative log-likelihood of the actual next token, and the argmax.

    ``logits`` [batch, sequence, vocab], ``input_ids`` [batch, sequence]; both results [batch, sequence - 1].
    """
    logits = np.asarray(logits)
    ids = np.asarray(input_ids)
    if logits.ndim != 3 or logits.shape[:2] != ids.shape:
        raise UserInputError(f"logits of shape {list(logits.shape)} do not match token rows {list(ids.shape)}")
    nll = np.empty((ids.shape[0], ids.shape[1] - 1), dtype=np.float64)
    best = np.empty_like(nll, dtype=np.int64)
    for row in range(ids.shape[0]):
        scores = logits[row, :-1].astype(np.float64)
        best[row] = np.argmax(np.nan_to_num(scores, nan=-np.inf), axis=-1)
        shifted = scores - scores.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=-1))
        nll[row] = log_norm - shifted[np.arange(ids.shape[1] - 1), ids[row, 1:]]
    return nll, best


def perplexity(nll: np.ndarray) -> float:
    mean = float(np.mean(nll)) if nll.size else float("nan")
    return float(np.exp(mean)) if np.isfinite(mean) else float("inf")


def generation_fidelity(reference_logits: np.ndarray, actual_logits: np.ndarray, input_ids: np.ndarray) -> dict:
    """A variant's figures on the held-out rows against the source model's logits on them (see the module doc)."""
    ref_nll, ref_best = next_token_scores(reference_logits, input_ids)
    act_nll, act_best = next_token_scores(actual_logits, input_ids)
    ppl, ppl_source = perplexity(act_nll), perplexity(ref_nll)
    values = cosines(np.asarray(reference_logits)[:, :-1], np.asarray(actual_logits)[:, :-1])
    return {
        "perplexity": ppl,
        "perplexity_source": ppl_source,
        "perplexity_ratio_source": ppl / ppl_source if ppl_source > 0 else float("inf"),
        "next_token_agreement": float(np.mean(act_best == ref_best)) if act_best.size else 0.0,
        "positions": int(act_best.size),
        "logits_cosine_min": float(values.min()) if values.size else 1.0,
        "logits_cosine_mean": float(values.mean()) if values.size else 1.0,
    }


def score_folder(session, samples: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                 config: dict[str, Any]) -> dict:
    """``generation_fidelity`` of a loaded model session on the stored samples and reference logits."""
    name = logits_name(config)
    actual = session.run(samples)[name]
    return generation_fidelity(reference[name], actual, samples[input_ids_name(config)])


def perplexity_ratio(generation: dict, baseline: dict | None) -> float | None:
    """The variant's perplexity over the fp32 export's; None without a baseline."""
    if not baseline or not baseline.get("perplexity"):
        return None
    return generation["perplexity"] / baseline["perplexity"]


def gate_reasons(gate: Gate, generation: dict, baseline: dict | None) -> list[str]:
    """Why a generation variant fails the gate (empty when it passes).

    ``perplexity_ratio_max`` is checked against the fp32 export (``baseline``: its generation
    figures); for the fp32 export itself, or when it was not measured, against the source model.
    """
    reasons = []
    ratio = perplexity_ratio(generation, baseline)
    against = "fp32's"
    if ratio is None:
        ratio, against = generation["perplexity_ratio_source"], "the source model's"
    if gate.perplexity_ratio_max is not None and ratio > gate.perplexity_ratio_max:
        reasons.append(f"perplexity {generation['perplexity']:.4g} is {ratio:.3f}x {against} "
                       f"> gate perplexity_ratio_max {gate.perplexity_ratio_max}")
    agreement = generation["next_token_agreement"]
    if gate.next_token_agreement_min is not None and agreement < gate.next_token_agreement_min:
        reasons.append(f"next_token_agreement {agreement:.4f} < gate next_token_agreement_min "
                       f"{gate.next_token_agreement_min}")
    return reasons


def apply_generation_gate(gate: Gate, rows: list[dict], baseline_name: str = "fp32") -> None:
    """The perplexity gate against fp32's, which needs fp32's perplexity (known only once every variant is
    built): rows of the selection table in place, as their ``generation`` figures say. Rows without them
    (tensor models) are left alone."""
    baseline = next((r for r in rows if r["variant"] == baseline_name), None)
    reference = (baseline or {}).get("generation")
    for row in rows:
        figures = row.get("generation")
        if row["variant"] == baseline_name or not figures:
            continue
        ratio = perplexity_ratio(figures, reference)
        row["perplexity_ratio"] = ratio
        reasons = [r for r in gate_reasons(gate, figures, reference) if r.startswith("perplexity")]
        if reasons and ratio is not None and row["passed"]:  # a rejected row keeps its first reasons
            row["reason"], row["passed"] = "; ".join(reasons), False
