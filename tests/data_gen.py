"""Generated English sentences for the distillation tests: the corpus example's (``examples/build_corpus.py``)."""

from __future__ import annotations

from tests.examples import load

example = load("build_corpus")
sentences, held_out, write_corpus = example.sentences, example.held_out, example.write_corpus
