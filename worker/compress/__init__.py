"""Structured pruning and knowledge distillation: one file per model family, plus the training loop.

``transformer.py`` prunes Hugging Face BERT-style encoders (layers, FFN neurons; heads where the
installed transformers can express them), ``cnn.py`` prunes convolution channels of a torch
module by L1 norm, ``distill.py`` trains the pruned student to match the teacher. torch is
imported inside the functions, never at module import.
"""
