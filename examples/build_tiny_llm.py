"""A small Llama-style language model with its own tokenizer, built here in seconds: no downloads.

    python examples/build_tiny_llm.py models/tiny-llm [--steps 150]

writes a Hugging Face folder (``config.json``, ``model.safetensors``, the tokenizer files) that
``examples/tiny-llm.yaml`` converts, quantizes and deploys, and ``tiny-llm-held-out.txt`` beside it: 48
sentences of the training kind that are not in the training text, which the job's gate
measures perplexity and next-token agreement on.

The tokenizer is a byte-level BPE of 512 tokens trained with ``tokenizers`` on generated English
sentences (``examples/build_corpus.py``); the model (hidden 128, 2 layers, 4 heads, 2 KV heads)
is trained on the same sentences for ``--steps`` batches (150: a loss near 1, ~15 s on 2 cores;
a step count, not a time, so that a loaded machine builds the same model), so that perplexity
means something and greedy continuations are sentences.

The model trains on token ids from the tokenizer *as saved and reloaded*: a tokenizer built in
memory can split a special token such as ``<|bos|>`` differently from its saved copy, and a model
trained on one and scored with the other disagrees with itself.

``--steps 0`` with ``--hidden``/``--layers``/... gives a random-initialized model of any size
(``scripts/bench/llm.py`` builds a 0.42 B one that way).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

BOS, EOS = "<|bos|>", "<|eos|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def corpus_module():
    """examples/build_corpus.py as a module (examples/ is a folder of scripts)."""
    path = Path(__file__).with_name("build_corpus.py")
    spec = importlib.util.spec_from_file_location("modelyard_example_build_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_tokenizer(lines: list[str], folder: Path, vocab_size: int = 512):
    """A byte-level BPE trained on lines, saved to folder with save_pretrained; returns the reloaded copy."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(lines, trainer)
    bos = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def llama_config(vocab_size: int, *, hidden: int, layers: int, heads: int, kv_heads: int,
                 intermediate: int | None = None, bos: int = 0, eos: int = 1, context: int = 512):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or hidden * 8 // 3 // 64 * 64 or 256,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=context, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )


def train(model, rows: list[list[int]], steps: int, *, sequence: int = 64, batch: int = 16,
          lr: float = 3e-3, seed: int = 0) -> float:
    """Train on packed rows of token ids for ``steps`` batches; returns the last batch's loss."""
    import torch

    torch.manual_seed(seed)
    stream = torch.tensor([token for row in rows for token in row], dtype=torch.long)
    windows = stream[: len(stream) // sequence * sequence].view(-1, sequence)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        picked = windows[torch.randint(len(windows), (batch,))]
        loss = model(input_ids=picked, labels=picked).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def held_out_path(folder: Path) -> Path:
    """Where ``build`` writes the held-out sentences: ``<folder>-held-out.txt`` beside the folder."""
    return folder.parent / f"{folder.name}-held-out.txt"


def build(folder: Path, *, steps: int = 150, hidden: int = 128, layers: int = 2, heads: int = 4,
          kv_heads: int = 2, intermediate: int | None = None, sentences: int = 4000, seed: int = 3) -> dict:
    """Write the model folder and ``held-out.txt`` beside it; returns what was built."""
    import torch
    from transformers import LlamaForCausalLM

    corpus = corpus_module()
    folder.mkdir(parents=True, exist_ok=True)
    lines = corpus.sentences(sentences, seed=seed)
    tokenizer = train_tokenizer(lines, folder)
    config = llama_config(len(tokenizer), hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                          intermediate=intermediate, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    loss = None
    if steps > 0:
        rows = [tokenizer(line)["input_ids"] + [tokenizer.eos_token_id] for line in lines]
        loss = train(model, rows, steps)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(folder), safe_serialization=True)
    held_out = held_out_path(folder)
    held_out.write_text("\n".join(corpus.held_out(lines, 48)) + "\n")
    parameters = sum(p.numel() for p in model.parameters())
    return {"folder": folder, "held_out": held_out, "loss": loss, "parameters": parameters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--steps", type=int, default=150, help="training batches; 0: random weights")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    args = parser.parse_args()
    built = build(args.folder, steps=args.steps, hidden=args.hidden, layers=args.layers, heads=args.heads,
                  kv_heads=args.kv_heads)
    loss = f", final training loss {built['loss']:.2f}" if built["loss"] is not None else ""
    print(f"wrote {built['folder']} ({built['parameters'] / 1e6:.2f} M parameters{loss}) and {built['held_out']}")


if __name__ == "__main__":
    main()
