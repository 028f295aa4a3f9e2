"""A text-generation job through the queue: convert → int4 / int8-weights → gate → deploy → ``modelyard serve``.

The model is the tiny trained Llama of ``tests.llm_models`` (no downloads). The served model's
streamed completion must be, token for token, what ONNX Runtime GenAI's greedy generation gives
on the deployed folder; a folder without a tokenizer must fail the job naming the problem.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from producer import api
from shared.repository import ModelRepository
from tests.llm_models import held_out, tiny_llm  # noqa: F401  (tiny_llm: a session fixture)

# The first test also trains the tiny model (about 2 CPU-minutes); a job builds three models on one worker.
pytestmark = [pytest.mark.integration, pytest.mark.heavy, pytest.mark.timeout(3600)]

PROMPT = "The quiet engineer"
JOB = """
model:
  name: tiny-llm
  source: {source}
  format: hf-transformers
  task: text-generation
  samples: {held_out}
convert: {{to: onnx}}
optimize:
  variants: [int4, int8-weights]
  gate: {{perplexity_ratio_max: 1.10, next_token_agreement_min: 0.90}}
  objective: size
deploy: {{repository: {repository}}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def greedy_text(folder: Path, prompt: str, max_tokens: int) -> tuple[str, int]:
    """ONNX Runtime GenAI's own greedy continuation of ``prompt`` on the folder: (text, tokens)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    tokens = []
    eos = set(int(t) for t in tokenizer.eos_token_ids)
    while not generator.is_done() and len(tokens) < max_tokens:
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if token in eos:
            break
        tokens.append(token)
    return tokenizer.decode(np.asarray(tokens, dtype=np.int32)), len(tokens)


def stream_completion(port: int, body: dict) -> list[dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        lines = response.read().decode().splitlines()
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


@pytest.fixture
def served(tmp_path):
    """Start ``modelyard serve`` on a free port; yields a function (model, repository) -> port."""
    processes = []

    def start(model: str, repository: str) -> int:
        port = free_port()
        log = open(tmp_path / "serve.log", "wb")
        command = [str(Path(sys.executable).with_name("modelyard")), "serve", model, "--repository", repository,
                   "--port", str(port), "--threads", "2"]
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as ready:
                    if ready.status == 200:
                        return port
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"modelyard serve did not get ready: {(tmp_path / 'serve.log').read_text()}")

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


def test_a_text_generation_job_deploys_int4_and_serves_greedy_tokens(cluster, producer_env, tiny_llm, tmp_path,
                                                                     served):
    repository = (tmp_path / "repo").as_uri()
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(source=tiny_llm, held_out=held_out(tiny_llm), repository=repository))
    result = api.wait(api.submit(job), timeout=1800)
    assert result["state"] == "SUCCEEDED", result.get("error")

    table = {row["variant"]: row for row in result["stages"]["select"]["table"]}
    assert set(table) == {"fp32", "int4", "int8-weights"}
    assert table["int4"]["verdict"] == "selected", table["int4"]
    int4 = table["int4"]["generation"]
    assert table["int4"]["perplexity_ratio"] <= 1.10 and int4["next_token_agreement"] >= 0.90
    assert table["int4"]["size_bytes"] < 0.5 * table["fp32"]["size_bytes"]
    for row in table.values():  # timed as served: paired decode and prefill, and each model's memory
        assert row["decode_tok_s"] > 0 and row["ttft_ms"] > 0 and row["peak_rss_mb"] > 0, row
    convert = result["stages"]["convert"]["metrics"]["fidelity"]
    assert convert["cosine_min"] > 0.9999

    repo = ModelRepository.open(repository)
    version = repo.resolve("tiny-llm", "production")
    manifest = repo.manifest("tiny-llm", version)
    assert manifest["task"] == "text-generation" and manifest["lineage"]["variant"] == "int4"
    folder = tmp_path / "repo" / "tiny-llm" / str(version)
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()}
    assert not (folder / "hf_source").exists()  # the source the variants were built from is not deployed

    expected, count = greedy_text(folder, PROMPT, max_tokens=24)
    port = served("tiny-llm", repository)
    chunks = stream_completion(port, {"model": "tiny-llm", "prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                      "stream": True, "stream_options": {"include_usage": True}})
    pieces = [c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is None]
    assert "".join(pieces) == expected and len(pieces) == count
    assert chunks[-1]["usage"]["completion_tokens"] == count
    assert len(expected.split()) >= 3  # a trained model continues with words

    too_long = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", headers={
        "Content-Type": "application/json"}, data=json.dumps({"prompt": PROMPT, "max_tokens": 100_000}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(too_long, timeout=30)
    assert refused.value.code == 400 and "MODELYARD_SERVE_MAX_TOKENS" in refused.value.read().decode()


def test_a_folder_without_a_tokenizer_fails_the_job_naming_it(cluster, producer_env, tiny_llm, tmp_path):
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_llm, broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).unlink()
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(source=broken, held_out=held_out(tiny_llm),
                              repository=(tmp_path / "repo").as_uri()))
    result = api.wait(api.submit(job), timeout=600)
    assert result["state"] == "FAILED"
    assert "the folder has no tokenizer (tokenizer.json or tokenizer.model)" in result["error"]
