# One image for every modelyard role: producer, cpu worker, gpu worker (add the gpu extra), Flower.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY worker ./worker
COPY producer ./producer
ARG EXTRAS=cpu,torch
RUN pip install --no-cache-dir ".[${EXTRAS}]" gcp-storage-emulator \
    && useradd --create-home --uid 10001 modelyard
USER modelyard
ENTRYPOINT ["modelyard"]
