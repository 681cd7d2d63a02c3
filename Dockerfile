# inference-worker image: the package (with the Kafka extra), its runtime dependencies and
# the model repository. The default base has the CUDA 12 runtime and cuDNN 9 that
# onnxruntime-gpu needs; without a GPU the worker falls back to the CPU (models.device
# auto). Build from the repository root: docker build -t inference-worker .
# (deploy/compose.yaml builds it for the stack.)
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
COPY inference_worker ./inference_worker
# The client distribution first: the worker depends on it and it is not on PyPI.
COPY client ./client
RUN pip install ./client ".[kafka]"
COPY config ./config

# Run unprivileged. Settings: config/worker.yaml, overridden by IW_<SECTION>__<KEY>.
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin worker
USER worker
# Prometheus metrics, /healthz and /readyz.
EXPOSE 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["inference-worker"]
CMD ["run", "--config", "config/worker.yaml"]
