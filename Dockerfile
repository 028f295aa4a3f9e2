# modelyard's images. One image serves every role: producer, workers, Flower, `modelyard serve`,
# `modelyard triton-sync`.
#   docker build -t modelyard:0.1.0 .                            cpu (the default target)
#   docker build --target gpu -t modelyard:0.1.0-gpu .          ONNX Runtime on CUDA, checked at start
#   docker build --target emulator -t modelyard-gcs-emulator .  the GCS emulator, for docker-compose only
# EXTRAS picks pyproject.toml's optional dependencies. The default has torch and tf (keras,
# SavedModel and TFLite jobs, and serving a TFLite version, need tf); a serve-only image:
#   docker build --build-arg EXTRAS=cpu -t modelyard:0.1.0-serve .
# torch comes from TORCH_INDEX, the CPU build by default: the public index's torch is the
# multi-GB CUDA build. The GPU image runs models with ONNX Runtime on CUDA, so torch stays CPU there too.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- what every target shares: OS packages, the user, the dependency lists ---------------------
FROM ${PYTHON_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /app
# bubblewrap: the sandbox every model load runs in (worker/sandbox). The worker runs it unprivileged,
# in a user namespace; docker-compose.yml and deploy/k8s give the containers what that needs.
# /data: where Flower and the emulator keep state. A named volume mounted there starts as a copy
# of this folder, owner included, so the image's user can write to it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 modelyard \
    && install -d -o modelyard -g modelyard /data
# One requirements file per extra, from pyproject.toml alone: the dependency layers below are
# rebuilt when pyproject.toml changes, not when the source does.
COPY pyproject.toml README.md ./
RUN python -c 'import pathlib, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; out = pathlib.Path("/opt/requirements"); out.mkdir(); (out / "base.txt").write_text("\n".join(p["dependencies"]) + "\n"); [(out / f"{k}.txt").write_text("\n".join(v) + "\n") for k, v in p["optional-dependencies"].items()]'
COPY deploy/docker/install-requirements /usr/local/bin/install-requirements
ENV MODELYARD_HEALTH_URL=http://127.0.0.1:8000/v2/health/ready
EXPOSE 8000

# -- the GCS emulator (docker-compose's stand-in for gs://): not in the production images -----
FROM base AS emulator
# hadolint ignore=DL3013
RUN pip install gcp-storage-emulator
USER 10001:10001
WORKDIR /data
HEALTHCHECK --interval=10s --timeout=5s --retries=6 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9023/storage/v1/b', timeout=4)"]
ENTRYPOINT ["gcp-storage-emulator"]
CMD ["start", "--host", "0.0.0.0", "--port", "9023"]

# -- the GPU image: onnxruntime-gpu with CUDA and cuDNN from pip; TensorRT if asked for ---------
FROM base AS gpu
ARG EXTRAS=gpu,torch,tf
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# TensorRT (for --device tensorrt and the trt-* variants) matches the CUDA and TensorRT versions
# the onnxruntime-gpu build was made with (onnxruntime.ai's TensorRT EP requirements), e.g.
# --build-arg TENSORRT_PACKAGE="tensorrt-cu13-libs==<version>"; empty: CUDA only.
ARG TENSORRT_PACKAGE=""
# hadolint ignore=DL3013
RUN install-requirements "onnxruntime-gpu[cuda,cudnn]" \
    && if [ -n "$TENSORRT_PACKAGE" ]; then pip install "$TENSORRT_PACKAGE"; fi \
    && python -c 'import glob, sysconfig; site = sysconfig.get_paths()["purelib"]; print("\n".join(sorted(glob.glob(site + "/nvidia/**/lib", recursive=True) + glob.glob(site + "/tensorrt_libs"))))' \
       > /etc/ld.so.conf.d/modelyard-cuda.conf \
    && ldconfig \
    && python -c 'import onnxruntime as ort; assert "CUDAExecutionProvider" in ort.get_available_providers(), ort.get_available_providers()'
COPY shared ./shared
COPY serving ./serving
COPY worker ./worker
COPY producer ./producer
RUN pip install --no-deps . && modelyard --version
USER 10001:10001
# At start (a build machine has no GPU): create a CUDA session, exit 3 with the reason if it does
# not load, else run the command. MODELYARD_REQUIRE_DEVICE=tensorrt checks TensorRT; empty skips.
ENV MODELYARD_REQUIRE_DEVICE=cuda
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import os, urllib.request; url = os.environ.get('MODELYARD_HEALTH_URL'); url and urllib.request.urlopen(url, timeout=4)"]
ENTRYPOINT ["python", "-m", "serving.device_check", "--", "modelyard"]

# -- the CPU image (the default target) ----------------------------------------------------------
FROM base AS cpu
ARG EXTRAS=cpu,torch,tf
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN install-requirements
COPY shared ./shared
COPY serving ./serving
COPY worker ./worker
COPY producer ./producer
RUN pip install --no-deps . && modelyard --version
USER 10001:10001
# `modelyard serve` answers /v2/health/ready; a container in another role sets MODELYARD_HEALTH_URL
# to its own probe, or to nothing (docker-compose.yml gives each service its own healthcheck).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import os, urllib.request; url = os.environ.get('MODELYARD_HEALTH_URL'); url and urllib.request.urlopen(url, timeout=4)"]
ENTRYPOINT ["modelyard"]
