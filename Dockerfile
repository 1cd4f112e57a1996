# syntax=docker/dockerfile:1
#
# Images for vlltr. Build one target at a time (serve-cpu, the last stage, is the default):
#
#   docker build --target serve-cpu -t vlltr:cpu .     # serving, ONNX Runtime on CPU, no torch
#   docker build --target serve-gpu -t vlltr:gpu .     # serving, ONNX Runtime CUDA (needs the NVIDIA runtime)
#   docker build --target train     -t vlltr:train .   # training + export, CPU torch
#
# The serving images run exactly `vlltr serve --host 0.0.0.0 --port 8000`, the same command the
# deployment tests start, so what the tests exercise is what the containers run. They carry the demo
# bundle (Digits-LT, tiny config) at /opt/vlltr/demo-bundle, trained and exported in the `demo` stage,
# and serve it while VLLTR_BUNDLE is left at its default; point VLLTR_BUNDLE at a mounted bundle
# (for example /bundles/current) to serve that one instead.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
# onnxruntime-gpu 1.31.1 on PyPI is built against CUDA 13 and cuDNN 9 (its wheel metadata pins
# nvidia-cuda-runtime~=13.0 and nvidia-cudnn-cu13~=9.0), so the runtime base must carry both.
# CUDA minor-version compatibility lets any 13.x runtime serve it; the host driver must be >= 580.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
# CPU-only torch wheels keep the training image at a few GB instead of pulling the CUDA stack. An
# empty value (--build-arg TORCH_INDEX_URL=) installs torch from PyPI alone, which serves its CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------------------------------------
# Builders: install the project into /opt/venv. Only the venv is copied into the final images,
# so pip's wheel cache, setuptools and the project sources stay behind.
#
# Both install in two steps: first the dependencies, resolved from pyproject.toml against an empty
# `vlltr` package, then the real sources without dependencies, so that a change to the sources
# reruns only the second, small step and not the download of onnxruntime and its dependencies.
# README.md only feeds the package's long description: an empty one keeps documentation edits from
# invalidating these layers (and the demo bundle's).
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build-cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml ./
RUN touch README.md && mkdir vlltr && touch vlltr/__init__.py \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ".[cpu]"
COPY vlltr ./vlltr
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --force-reinstall . \
    && /opt/venv/bin/pip check \
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
COPY pyproject.toml ./
RUN touch README.md && mkdir vlltr && touch vlltr/__init__.py \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ".[gpu]"
COPY vlltr ./vlltr
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --force-reinstall . \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip uninstall --yes pip setuptools wheel

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
    && /opt/venv/bin/pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} ".[train,cpu]"
USER 10001:10001
WORKDIR /work
# Training runs are batch jobs, not services: nothing to probe.
HEALTHCHECK NONE
ENTRYPOINT ["vlltr"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
# demo: the demo bundle the serving images carry (Digits-LT, tiny config; about a minute of
# training on two cores). One step installs the training extra into a throwaway venv, trains,
# exports and deletes the venv and the run, so this stage's layers hold the bundle and not torch.
# Only the modules training imports are copied (the import contracts keep vlltr.training off the
# service and the command line), so a change to the service does not retrain the demo.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS demo
ARG TORCH_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml ./
COPY vlltr/__init__.py vlltr/errors.py ./vlltr/
COPY vlltr/model ./vlltr/model
COPY vlltr/training ./vlltr/training
RUN touch README.md \
    && python -m venv /tmp/train-venv \
    && /tmp/train-venv/bin/pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} ".[train,cpu]" \
    && /tmp/train-venv/bin/python -m vlltr.training.demo --out /opt/vlltr/demo-bundle --work /tmp/demo-work \
    && rm -rf /tmp/train-venv /tmp/demo-work /root/.cache

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
    VLLTR_BUNDLE=/opt/vlltr/demo-bundle \
    VLLTR_CACHE_DIR=/var/lib/vlltr/cache \
    VLLTR_CLASS_STORE=/var/lib/vlltr/classes.json \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --system --gid 10001 vlltr \
    && useradd --system --uid 10001 --gid vlltr --home-dir /home/vlltr --create-home \
       --shell /usr/sbin/nologin vlltr \
    && mkdir -p /var/lib/vlltr/cache /bundles \
    && chown -R vlltr:vlltr /var/lib/vlltr /bundles
USER 10001:10001
WORKDIR /home/vlltr
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["vlltr", "serve", "--host", "0.0.0.0", "--port", "8000"]
# As in serve-cpu: the large copies come last.
COPY --from=build-gpu /opt/venv /opt/venv
COPY --from=demo /opt/vlltr/demo-bundle /opt/vlltr/demo-bundle

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
    VLLTR_BUNDLE=/opt/vlltr/demo-bundle \
    VLLTR_CACHE_DIR=/var/lib/vlltr/cache \
    VLLTR_CLASS_STORE=/var/lib/vlltr/classes.json
RUN groupadd --system --gid 10001 vlltr \
    && useradd --system --uid 10001 --gid vlltr --home-dir /home/vlltr --create-home \
       --shell /usr/sbin/nologin vlltr \
    && mkdir -p /var/lib/vlltr/cache /bundles \
    && chown -R vlltr:vlltr /var/lib/vlltr /bundles
USER 10001:10001
WORKDIR /home/vlltr
EXPOSE 8000
# Ready means bundle loaded, sessions warmed and class table loaded; the start period covers
# loading and warming a large mounted bundle.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["vlltr", "serve", "--host", "0.0.0.0", "--port", "8000"]
# The large copies come last: every later instruction would otherwise be a new layer over them (with
# podman's vfs storage, a full copy of the file system each). COPY writes as root whatever USER says.
COPY --from=build-cpu /opt/venv /opt/venv
# Owned by root and only read: the service writes nothing next to a bundle, so the demo is served
# from a read-only root filesystem too. Mounts go to /bundles and state to /var/lib/vlltr, so
# neither can hide it.
COPY --from=demo /opt/vlltr/demo-bundle /opt/vlltr/demo-bundle
