# syntax=docker/dockerfile:1
#
# Images for vlltr. Build one target at a time:
#
#   docker build --target serve-cpu -t vlltr:cpu .     # serving, ONNX Runtime on CPU, no torch
#   docker build --target serve-gpu -t vlltr:gpu .     # serving, ONNX Runtime CUDA (needs the NVIDIA runtime)
#   docker build --target train     -t vlltr:train .   # training + export, CPU torch
#
# The serving images run exactly `vlltr serve --host 0.0.0.0 --port 8000`, the same command the
# deployment tests start, so what the tests exercise is what the containers run.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
# onnxruntime-gpu 1.31.1 on PyPI is built against CUDA 13 and cuDNN 9 (its wheel metadata pins
# nvidia-cuda-runtime~=13.0 and nvidia-cudnn-cu13~=9.0), so the runtime base must carry both.
# CUDA minor-version compatibility lets any 13.x runtime serve it; the host driver must be >= 580.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
# CPU-only torch wheels keep the training image at a few GB instead of pulling the CUDA stack.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------------------------------------
# Builders: install the project into /opt/venv. Only the venv is copied into the final images,
# so pip's wheel cache, setuptools and the project sources stay behind.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build-cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vlltr ./vlltr
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ".[cpu]" \
    && /opt/venv/bin/pip uninstall --yes pip setuptools wheel

FROM ${CUDA_IMAGE} AS build-gpu
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# Distribution packages follow the base image's release; pinning exact Ubuntu revisions would break
# the build at every security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vlltr ./vlltr
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ".[gpu]" \
    && /opt/venv/bin/pip uninstall --yes pip setuptools wheel

# ---------------------------------------------------------------------------------------------
# serve-cpu: the default serving image (ONNX Runtime CPU, no torch, no compilers).
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS serve-cpu
LABEL org.opencontainers.image.title="vlltr-serve-cpu" \
      org.opencontainers.image.description="VL-LTR image classification service (ONNX Runtime, CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VLLTR_PROVIDER=cpu \
    VLLTR_CACHE_DIR=/var/lib/vlltr/cache \
    VLLTR_CLASS_STORE=/var/lib/vlltr/classes.json
RUN groupadd --system --gid 10001 vlltr \
    && useradd --system --uid 10001 --gid vlltr --home-dir /home/vlltr --create-home \
       --shell /usr/sbin/nologin vlltr \
    && mkdir -p /var/lib/vlltr/cache /bundles \
    && chown -R vlltr:vlltr /var/lib/vlltr /bundles
COPY --from=build-cpu /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/vlltr
EXPOSE 8000
# Ready means bundle loaded, sessions warmed and class table loaded; the start period covers the
# first-use build of the demo bundle when no VLLTR_BUNDLE is mounted.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["vlltr", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
# serve-gpu: ONNX Runtime with the CUDA execution provider. The service checks the providers the
# session actually got and reports a CPU fallback in its log, /v1/model and metrics.
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS serve-gpu
LABEL org.opencontainers.image.title="vlltr-serve-gpu" \
      org.opencontainers.image.description="VL-LTR image classification service (ONNX Runtime, CUDA 13 + cuDNN 9)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# Only the interpreter: the venv built above links against this same /usr/bin/python3.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VLLTR_PROVIDER=auto \
    VLLTR_CACHE_DIR=/var/lib/vlltr/cache \
    VLLTR_CLASS_STORE=/var/lib/vlltr/classes.json \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --system --gid 10001 vlltr \
    && useradd --system --uid 10001 --gid vlltr --home-dir /home/vlltr --create-home \
       --shell /usr/sbin/nologin vlltr \
    && mkdir -p /var/lib/vlltr/cache /bundles \
    && chown -R vlltr:vlltr /var/lib/vlltr /bundles
COPY --from=build-gpu /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/vlltr
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["vlltr", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
# train: stage 1/2 training, evaluation, calibration and `vlltr export`, on CPU torch.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS train
ARG TORCH_INDEX_URL
LABEL org.opencontainers.image.title="vlltr-train" \
      org.opencontainers.image.description="VL-LTR training and bundle export (CPU torch)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VLLTR_CACHE_DIR=/work/cache
RUN groupadd --system --gid 10001 vlltr \
    && useradd --system --uid 10001 --gid vlltr --home-dir /home/vlltr --create-home \
       --shell /bin/bash vlltr \
    && mkdir -p /work/cache /bundles \
    && chown -R vlltr:vlltr /work /bundles
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vlltr ./vlltr
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" ".[train,cpu]"
USER 10001:10001
WORKDIR /work
# Training runs are batch jobs, not services: nothing to probe.
HEALTHCHECK NONE
ENTRYPOINT ["vlltr"]
CMD ["--help"]
