"""Unlabelled English sentences for distillation: templates × vocabulary, seeded, no downloads.

    python examples/build_corpus.py models/minilm-text [--sentences 10000]

writes ``corpus.txt`` (the distillation data of ``examples/minilm-compress.yaml``) and
``held-out.txt`` (64 sentences of the same kind that are not in the corpus: the samples the
student is measured on against the teacher). ``sentences(n, seed)`` returns n sentences such as
"The quiet engineer repaired an old bridge near the harbour on Monday." Every template slot
draws from its own word list, so a few thousand sentences cover a few hundred distinct words in
varied positions and lengths: a stand-in for a team's own text, which is what a real student is
distilled on.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

WORDS = {
    "adj": ["quiet", "tired", "curious", "young", "clever", "angry", "patient", "famous", "nervous", "friendly",
            "old", "new", "broken", "expensive", "tiny", "enormous", "bright", "dark", "strange", "simple",
            "modern", "ancient", "noisy", "careful", "lucky", "green", "heavy", "fragile", "rare", "busy"],
    "person": ["engineer", "teacher", "doctor", "farmer", "student", "pilot", "chef", "lawyer", "nurse", "artist",
               "mechanic", "journalist", "scientist", "musician", "librarian", "manager", "child", "neighbor",
               "driver", "writer", "senator", "customer", "volunteer", "athlete", "baker"],
    "thing": ["bridge", "laptop", "garden", "contract", "painting", "bicycle", "report", "kitchen", "engine",
              "letter", "phone", "window", "recipe", "database", "camera", "ticket", "novel", "fence", "server",
              "song", "map", "boat", "budget", "website", "telescope", "sandwich", "jacket", "museum", "printer"],
    "verb": ["repaired", "painted", "bought", "sold", "cleaned", "designed", "opened", "found", "lost", "borrowed",
             "described", "ignored", "studied", "tested", "delivered", "replaced", "measured", "photographed",
             "built", "inspected", "explained", "recommended", "returned", "checked", "shared"],
    "place": ["the harbour", "the station", "the office", "the village", "the library", "the market",
              "the hospital", "the airport", "the river", "the mountains", "the stadium", "the old town",
              "the school", "the factory", "the beach", "the square", "the forest", "the museum", "the bakery",
              "the university"],
    "time": ["on Monday", "last night", "this morning", "after lunch", "before the storm", "in the spring",
             "during the meeting", "at dawn", "every weekend", "two years ago", "yesterday", "at midnight",
             "later that week", "in December", "after the holidays"],
    "feeling": ["happy", "worried", "surprised", "disappointed", "relieved", "excited", "confused", "proud",
                "annoyed", "grateful"],
    "topic": ["interest rates", "the weather", "climate change", "the election", "electric cars", "the new policy",
              "rising prices", "the football match", "space travel", "the housing market", "public transport",
              "artificial intelligence", "the school budget", "the flood", "the concert"],
    "adverb": ["slowly", "carefully", "quickly", "quietly", "happily", "suddenly", "eventually", "nearly",
               "proudly", "barely"],
    "number": ["two", "three", "five", "seven", "ten", "twelve", "twenty", "fifty", "a hundred", "several"],
}

TEMPLATES = [
    "The {adj} {person} {verb} a {adj} {thing} near {place} {time}.",
    "{time}, a {person} {adverb} {verb} the {thing} at {place}.",
    "Why did the {person} say that {topic} would change everything?",
    "My {person} was {feeling} when the {thing} arrived {time}.",
    "Nobody expected the {adj} {thing} to be {verb} so {adverb}.",
    "We talked about {topic} for {number} hours at {place}.",
    "The {thing} was {adj}, but the {person} {verb} it anyway.",
    "Could you tell me where the {adj} {thing} is kept at {place}?",
    "After reading about {topic}, the {person} felt {feeling}.",
    "{number} {person}s {verb} the {thing} {time} and left {adverb}.",
    "I think the {thing} at {place} is too {adj} for a {person}.",
    "The report on {topic} was published {time} by a {adj} {person}.",
    "She {adverb} {verb} the {adj} {thing} while the {person} watched.",
    "Please bring the {thing} to {place} before {number} o'clock.",
    "If the {thing} breaks again, the {person} will be {feeling}.",
    "A {adj} {person} from {place} won the prize for a {adj} {thing}.",
    "Prices for the {thing} rose by {number} percent {time}.",
    "Is it true that {topic} worries every {person} in {place}?",
    "The {person} and the {person} {verb} {number} {thing}s together.",
    "Honestly, the {thing} was {adj} and the service at {place} was {adj}.",
]


def sentence(rng: random.Random) -> str:
    template = rng.choice(TEMPLATES)
    text = ""
    rest = template
    while "{" in rest:
        head, _, tail = rest.partition("{")
        slot, _, rest = tail.partition("}")
        text += head + rng.choice(WORDS[slot])
    text += rest
    return text[0].upper() + text[1:]


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(count)]


def write_corpus(path: Path, count: int, seed: int = 0) -> Path:
    path.write_text("\n".join(sentences(count, seed)) + "\n")
    return path


def held_out(corpus: list[str], count: int = 64, seed: int = 99) -> list[str]:
    """count sentences of the corpus's kind that are not in it."""
    seen, found = set(corpus), []
    rng = random.Random(seed)
    while len(found) < count:
        line = sentence(rng)
        if line not in seen:
            seen.add(line)
            found.append(line)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--sentences", type=int, default=10_000)
    parser.add_argument("--held-out", type=int, default=64)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    corpus = sentences(args.sentences, seed=3)
    (args.folder / "corpus.txt").write_text("\n".join(corpus) + "\n")
    (args.folder / "held-out.txt").write_text("\n".join(held_out(corpus, args.held_out)) + "\n")
    print(f"wrote {args.folder / 'corpus.txt'} ({len(corpus)} sentences) and "
          f"{args.folder / 'held-out.txt'} ({args.held_out})")


if __name__ == "__main__":
    main()
