"""Speed and memory of text-generation models, measured as they are served: ONNX Runtime GenAI at batch 1.

``measure_generation`` loads fp32 and every variant into one process and times them paired
(``shared.inference.paired``: interleaved rounds, each variant's ratio to fp32 with its interval):

* time to first token (``ttft``): a new generator, the prompt appended (prefill), the first token;
* decode: ``decode_tokens`` more greedy tokens on a generator already holding the prompt (it is
  rewound to the prompt before each run, so every run decodes the same positions); tokens/s is
  ``decode_tokens`` over the run's time.

Peak memory is each model's own: a child process (``python -m shared.inference.generation_timing``)
loads the folder, generates once and reports its peak RSS (``VmHWM``), and the peak it had
before loading the model (the interpreter and the runtime), so that ``peak_rss_mb - base_rss_mb``
is what the model costs.

``onnxruntime_genai`` is imported inside the functions: a prefork worker must not import it before forking.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import UserInputError, one_line
from shared.inference.paired import PairedPlan, measure_paired

PROMPT_TOKENS = 128
DECODE_TOKENS = 16
RSS_TIMEOUT_S = 1800


def load_model(folder: Path, *, threads: int):
    """An ``onnxruntime_genai.Model`` of the folder with ``threads`` intra-op threads; UserInputError if it fails."""
    import onnxruntime_genai as og

    options = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
    try:
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        return og.Model(config)
    except Exception as exc:
        raise UserInputError(f"the generation model in {Path(folder).name} cannot be loaded: {one_line(exc)}") from None


def prompt_of(token_rows: np.ndarray, length: int = PROMPT_TOKENS) -> np.ndarray:
    """``length`` token ids from the rows of held-out text (end to end, repeated if they are shorter)."""
    stream = np.asarray(token_rows, dtype=np.int32).reshape(-1)
    if not stream.size:
        raise UserInputError("no tokens to build a prompt from")
    return np.resize(stream, length).astype(np.int32)


@dataclass
class GenerationRunners:
    """Zero-argument calls that time one model: ``ttft`` (prefill + first token) and ``decode``."""

    model: object
    prompt: np.ndarray
    decode_tokens: int
    load_s: float

    def __post_init__(self) -> None:
        self._decoder = self._generator()  # holds the prompt; rewound before every decode run
        self._decoder.append_tokens(self.prompt)
        self._decoder.generate_next_token()

    def _generator(self):
        import onnxruntime_genai as og

        # Room to spare: after rewind_to, ONNX Runtime GenAI 0.18 counts one token more than it keeps.
        total = len(self.prompt) + 2 * self.decode_tokens + 8
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)  # no early end-of-text
        return og.Generator(self.model, params)

    def ttft(self) -> int:
        generator = self._generator()
        generator.append_tokens(self.prompt)
        generator.generate_next_token()
        return int(generator.get_next_tokens()[0])

    def decode(self) -> None:
        self._decoder.rewind_to(len(self.prompt) + 1)
        for _ in range(self.decode_tokens):
            self._decoder.generate_next_token()


def runners_for(folder: Path, prompt: np.ndarray, *, threads: int, decode_tokens: int = DECODE_TOKENS,
                clock: Callable[[], float] = time.perf_counter) -> GenerationRunners:
    started = clock()
    model = load_model(folder, threads=threads)
    return GenerationRunners(model=model, prompt=np.asarray(prompt, dtype=np.int32), decode_tokens=decode_tokens,
                             load_s=clock() - started)


def measure_generation(folders: Mapping[str, Path], baseline: str, prompt: np.ndarray, *, threads: int,
                       plan: PairedPlan | None = None, decode_tokens: int = DECODE_TOKENS,
                       peak_memory: bool = True) -> dict:
    """Paired TTFT and decode timing of every folder, plus each one's load time and peak RSS.

    Returns ``{"decode": measure_paired(...), "ttft": measure_paired(...), "prompt_tokens": n,
    "decode_tokens": n, "models": {name: {"load_s", "ttft_ms", "decode_tok_s", "peak_rss_mb",
    "base_rss_mb", "ttft_ratio", "decode_speedup"}}}``; ``decode`` is the measurement a selection
    judges speed by (the objective: decode tokens/s at batch 1).
    """
    plan = plan or PairedPlan()
    runners = {name: runners_for(folder, prompt, threads=threads, decode_tokens=decode_tokens)
               for name, folder in folders.items()}
    decode = measure_paired({name: r.decode for name, r in runners.items()}, baseline, plan)
    ttft = measure_paired({name: r.ttft for name, r in runners.items()}, baseline, plan)
    models = {}
    for name, runner in runners.items():
        figures = {"load_s": round(runner.load_s, 4), "ttft_ms": ttft["models"][name]["p50_ms"],
                   "decode_tok_s": decode_tokens / (decode["models"][name]["p50_ms"] / 1000.0)}
        if name in decode["ratios"]:
            figures["decode_speedup"] = 1.0 / decode["ratios"][name]["ratio"]
            figures["ttft_ratio"] = ttft["ratios"][name]["ratio"]
        models[name] = figures
    del runners
    if peak_memory:
        for name, folder in folders.items():
            models[name].update(peak_rss(folder, prompt, threads=threads, decode_tokens=decode_tokens))
    return {"decode": decode, "ttft": ttft, "prompt_tokens": int(len(prompt)), "decode_tokens": decode_tokens,
            "models": models}


def peak_rss(folder: Path, prompt: np.ndarray, *, threads: int, decode_tokens: int = DECODE_TOKENS) -> dict:
    """``{"peak_rss_mb", "base_rss_mb"}`` of a child process that loads the folder and generates once."""
    command = [sys.executable, "-m", "shared.inference.generation_timing", str(folder), "--threads", str(threads),
               "--decode-tokens", str(decode_tokens), "--prompt", ",".join(str(int(t)) for t in prompt)]
    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=RSS_TIMEOUT_S, check=False, cwd=root)
    except subprocess.TimeoutExpired:
        return {"peak_rss_error": f"the memory probe took over {RSS_TIMEOUT_S} s"}
    if done.returncode != 0:
        return {"peak_rss_error": one_line((done.stderr or done.stdout).strip().splitlines()[-1:] or "no output")}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss_mb() -> float:
    """This process's peak RSS in MB: VmHWM, which starts afresh at exec. (``ru_maxrss`` does not: a child
    started by a large worker would report the worker's peak.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kilobytes on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description="peak RSS of one generation model: load, generate once")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    parser.add_argument("--prompt", required=True, help="comma-separated token ids")
    args = parser.parse_args()
    import onnxruntime_genai  # noqa: F401  (the runtime's own memory belongs to the base)

    base = _rss_mb()
    prompt = np.asarray([int(t) for t in args.prompt.split(",")], dtype=np.int32)
    runner = runners_for(args.folder, prompt, threads=args.threads, decode_tokens=args.decode_tokens)
    runner.ttft()
    runner.decode()
    print(json.dumps({"peak_rss_mb": round(_rss_mb(), 1), "base_rss_mb": round(base, 1)}))


if __name__ == "__main__":
    main()
