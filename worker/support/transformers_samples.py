"""Sample inputs for a Hugging Face text model: token-id rows from the job's text or arrays, or built-in sentences.

Text given by the job (``model.samples: file.txt``, one example per line): for
``feature-extraction`` the lines are packed into rows of exactly ``sequence`` tokens
(``packed_rows``: token states are compared position by position, so no padding); for the
pooled tasks each line is one row, padded to the longest (``line_rows``: the graph masks the
padding).

When the job gives none: if the folder has a tokenizer, rows of real English text with no
padding (``SENTENCES`` in turn, cut into rows of exactly ``sequence`` tokens framed by the
tokenizer's special tokens, no sentence in two rows while there are sentences left), so the
attention mask is all ones and every position the fidelity check compares is a real token;
otherwise random token ids drawn with ``convert.samples.seed``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.arrays import Arrays
from shared.errors import UserInputError
from worker.support.plugin_io import ConvertRequest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")

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
    "Our neighbours adopted a three-legged cat from the shelter last spring.",
    "The patient's blood pressure dropped sharply after the second dose.",
    "The airline posted its first annual profit since the pandemic began.",
    "If the printer jams again, open the rear tray and remove the crumpled sheet.",
    "The violinist practised the same four bars for an entire afternoon.",
    "Honeybees navigate by the position of the sun, even on cloudy days.",
    "The landlord promised to fix the leaking roof before winter arrives.",
    "Can we move tomorrow's meeting to half past three instead?",
    "The novel follows two sisters who run a bakery in post-war Naples.",
    "Sea levels along the eastern seaboard are rising faster than the global average.",
    "A stray dog followed the postman along his entire morning round.",
    "The firmware update drains the battery overnight, according to several users.",
    "Archaeologists uncovered a Roman mosaic beneath a car park in the town centre.",
    "Knead the dough for ten minutes, then leave it to rise in a warm place.",
    "The referee showed a red card after the defender's reckless tackle.",
    "Most of the village lost power when the storm brought down the lines.",
    "I'd rather take the scenic route, even if it adds an hour to the trip.",
    "The vaccine trial enrolled more than thirty thousand volunteers on four continents.",
    "Why does the app log me out every time I switch to another window?",
    "The ancient olive trees on the hillside are older than the monastery itself.",
    "Our quarterly revenue exceeded expectations thanks to strong holiday sales.",
    "The toddler insisted on wearing rain boots to the birthday party.",
    "Compilers translate source code into instructions the processor can execute.",
    "The ferry to the island runs twice a day except on public holidays.",
    "She finished the marathon in under four hours despite a sprained ankle.",
    "Customs officers seized two tonnes of counterfeit medicine at the port.",
    "The soup tasted bland, so we added a squeeze of lemon and some chilli.",
    "A cold front will bring frost to the northern valleys by Thursday night.",
    "Volunteers repainted the community hall in bright yellow over one weekend.",
    "Investors worry that rising wages will push inflation above the target.",
    "The kitten knocked a glass of water onto my laptop keyboard.",
    "Parliament approved the budget after a debate that lasted until dawn.",
    "Replace the air filter every six months to keep the engine efficient.",
    "The documentary explores how coral reefs recover after bleaching events.",
    "Our train was cancelled, so we shared a taxi with a couple from Leeds.",
    "A small bakery near the station runs out of croissants before eight o'clock.",
    "Researchers trained the robot to fold towels by watching human videos.",
    "Is it safe to drink tap water in this part of the country?",
    "The choir rehearsed in the cathedral, where every note echoed for seconds.",
    "Wildfires have burned more than a million acres across the region this summer.",
    "The manager thanked the staff for staying late during the inventory count.",
    "Lightning struck the old oak tree, splitting its trunk down the middle.",
    "My sister is learning to play the cello at the age of fifty.",
    "The software crashes whenever the file name contains an accented letter.",
    "Migrating geese stop at the lake every October on their way south.",
    "The jury deliberated for three days before reaching a unanimous verdict.",
    "Fresh snow closed the mountain pass, stranding dozens of lorries overnight.",
]


def sample_inputs(request: ConvertRequest, folder: Path, config: Any, input_names: list[str],
                  task: str) -> tuple[Arrays, str]:
    """The conversion's sample rows and where they came from: user-text, user, sentences or random-ids."""
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
    tokenizer = load_tokenizer(folder)
    if tokenizer is not None:
        ids = sentence_ids(tokenizer, spec.batch, spec.sequence)
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
    return complete({"input_ids": ids}, input_names), origin


def _text_samples(request: ConvertRequest, folder: Path, input_names: list[str], task: str,
                  sequence: int) -> tuple[Arrays, str]:
    origin = f"model.samples {request.model.samples or 'text'}"
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise UserInputError(f"{origin}: text samples need the model's tokenizer in the folder")
    if task == "feature-extraction":  # token states are compared position by position: no padding
        ids = packed_rows(tokenizer, request.sample_text, sequence, origin)
        return complete({"input_ids": ids}, input_names), "user-text"
    return line_rows(tokenizer, request.sample_text, sequence, input_names, origin), "user-text"


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it has none (or a broken one: random ids are used instead)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception:
        return None


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
    return complete({"input_ids": ids, "attention_mask": mask}, input_names)


def sentence_ids(tokenizer, batch: int, sequence: int, sentences: Sequence[str] = SENTENCES) -> np.ndarray:
    """batch rows of exactly `sequence` real tokens: [CLS] sentence sentence ... [SEP], no padding.

    The rows take whole sentences in turn, each row starting with the sentence after the one the
    previous row ended on, so no sentence is in two rows until all are used: the rows the optimize
    stage holds out for the gate (``worker.stages.holdout``) share no sentence with the rows a
    plugin calibrates on. Only a batch needing more than the sentences' ~1,500 tokens starts over.
    """
    encoded = [ids for ids in (tokenizer.encode(text, add_special_tokens=False) for text in sentences) if ids]
    if not encoded:
        raise UserInputError("the tokenizer encodes the built-in sample sentences to nothing")
    head, tail = _frame(tokenizer, sequence)
    body = max(sequence - len(head) - len(tail), 0)
    rows, cursor = [], 0
    for _row in range(batch):
        tokens: list[int] = []
        while len(tokens) < body:  # whole sentences; the last one cut at the row's end, its rest unused
            tokens.extend(encoded[cursor % len(encoded)])
            cursor += 1
        rows.append(head + tokens[:body] + tail)
    return np.asarray(rows, dtype=np.int64)


def complete(arrays: Arrays, input_names: list[str]) -> Arrays:
    """Add an all-ones attention mask and zero token types where the model takes them."""
    ids = arrays["input_ids"].astype(np.int64)
    result = {"input_ids": ids}
    if "attention_mask" in input_names:
        result["attention_mask"] = arrays.get("attention_mask", np.ones_like(ids))
    if "token_type_ids" in input_names:
        result["token_type_ids"] = arrays.get("token_type_ids", np.zeros_like(ids))
    return {name: np.ascontiguousarray(result[name], dtype=np.int64) for name in input_names}


def _frame(tokenizer, sequence: int) -> tuple[list[int], list[int]]:
    """The special tokens that open and close a row ([CLS] and [SEP] for BERT), if the row has room."""
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    head = [first] if first is not None and sequence >= 3 else []
    tail = [last] if last is not None and sequence >= 3 else []
    return head, tail


def _user_samples(samples: Arrays, input_names: list[str], config: Any, origin: str) -> Arrays:
    """The user's .npz as token-id rows: input_ids required, ids within the vocabulary, every array its shape."""
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
    return complete(arrays, input_names)
