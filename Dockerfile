# syntax=docker/dockerfile:1
# xclip-serve images, one build target each (docs/DEPLOY.md):
#   serve-cpu  the HTTP service on ONNX Runtime + FAISS: the `serve` extra only, no torch, no compiler
#   serve-gpu  the same service on CUDA: onnxruntime-gpu + faiss-gpu-cu12 on an nvidia/cuda cuDNN runtime base
#   train      torch + the whole CLI (data, train, export, index build, deploy) and npm for `data emoji`
# Every target installs its dependencies from a list generated out of pyproject.toml (deploy/requirements.py)
# before any source is copied: editing code rebuilds only the last, small layer of each image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# CUDA 12 + cuDNN 9, what both GPU wheels below are built for (minor-version compatible across 12.x)
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04

# ---- the project's source, in one place ------------------------------------------------------------------------
FROM scratch AS source
COPY pyproject.toml /src/
COPY core /src/core
COPY training /src/training
COPY index /src/index
COPY service /src/service
COPY xclip_serve /src/xclip_serve

# ---- CPU images: Debian slim with CPython 3.11 ----------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# one unprivileged user (same uid in every image, so the shared volumes stay writable) owning the data folders;
# a named volume mounted on one of them starts with this ownership
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin xclip \
    && install -d -o xclip -g xclip /data /data/bundles /data/state /data/cache /data/runs

FROM python-base AS serve-cpu-builder
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml deploy/requirements.py ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python requirements.py pyproject.toml serve > requirements.txt \
    && pip install -r requirements.txt
COPY --from=source /src /src
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps .

FROM python-base AS serve-cpu
COPY --from=serve-cpu-builder /opt/venv /opt/venv
# configuration by environment only (docs/SERVICE.md); XCLIP_BUNDLE and the API keys come from the deployment
ENV PATH=/opt/venv/bin:$PATH \
    XCLIP_HOST=0.0.0.0 \
    XCLIP_PORT=8000 \
    XCLIP_STATE_DIR=/data/state
USER 10001:10001
WORKDIR /data
VOLUME ["/data/bundles", "/data/state"]
EXPOSE 8000
# ready = a model is active (/readyz answers 503 before); urlopen raises on any status >= 400
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('XCLIP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["xclip-serve", "serve"]

# ---- GPU service: Ubuntu 22.04 + CUDA 12 + cuDNN 9 from the base image, Python 3.11 from Ubuntu ----------------
FROM ${CUDA_IMAGE} AS cuda-python
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin xclip \
    && install -d -o xclip -g xclip /data /data/bundles /data/state

FROM cuda-python AS serve-gpu-builder
# onnxruntime-gpu 1.27 and later on PyPI are CUDA 13 builds; 1.26.0 is the last CUDA 12 one, which is what
# faiss-gpu-cu12 needs next to it in the same process
ARG ORT_GPU_VERSION=1.26.0
ARG FAISS_GPU_VERSION=1.14.1.post1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml deploy/requirements.py ./
# the serve extra with the gpu extra in place of onnxruntime + faiss-cpu; faiss-gpu-cu12 without its pip CUDA
# libraries (the base image has them: see _FAISS_WHEEL_DISABLE_CUDA_PRELOAD below)
RUN --mount=type=cache,target=/root/.cache/pip \
    printf 'onnxruntime-gpu==%s\nfaiss-gpu-cu12==%s\n' "$ORT_GPU_VERSION" "$FAISS_GPU_VERSION" > gpu-pins.txt \
    && python requirements.py pyproject.toml serve --without onnxruntime faiss-cpu > serve.txt \
    && python requirements.py pyproject.toml gpu --no-core --only onnxruntime-gpu > gpu-ort.txt \
    && python requirements.py pyproject.toml gpu --no-core --only faiss-gpu-cu12 > gpu-faiss.txt \
    && pip install -c gpu-pins.txt -r serve.txt -r gpu-ort.txt \
    && pip install --no-deps -c gpu-pins.txt -r gpu-faiss.txt
COPY --from=source /src /src
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps .

FROM cuda-python AS serve-gpu
COPY --from=serve-gpu-builder /opt/venv /opt/venv
# faiss-gpu-cu12 preloads libcudart/libcublas from pip packages unless told to use the system's (the base image's)
ENV PATH=/opt/venv/bin:$PATH \
    _FAISS_WHEEL_DISABLE_CUDA_PRELOAD=1 \
    XCLIP_HOST=0.0.0.0 \
    XCLIP_PORT=8000 \
    XCLIP_STATE_DIR=/data/state \
    XCLIP_PROVIDERS=cuda
USER 10001:10001
WORKDIR /data
VOLUME ["/data/bundles", "/data/state"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('XCLIP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["xclip-serve", "serve"]

# ---- trainer: torch (CPU wheel unless TORCH_INDEX_URL names a CUDA one) + every extra but dev -----------------
FROM python-base AS train-builder
# e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 for a CUDA build of the same version
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml deploy/requirements.py ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python requirements.py pyproject.toml train --no-core --only torch > torch.txt \
    && pip install --index-url "$TORCH_INDEX_URL" -r torch.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    python requirements.py pyproject.toml train serve > requirements.txt \
    && pip install -r requirements.txt
COPY --from=source /src /src
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps .

FROM python-base AS train
# npm: `xclip-serve data emoji` fetches its data set with `npm pack`
RUN apt-get update \
    && apt-get install -y --no-install-recommends nodejs npm \
    && rm -rf /var/lib/apt/lists/*
COPY --from=train-builder /opt/venv /opt/venv
COPY --chmod=0755 deploy/demo-init.sh /usr/local/bin/xclip-demo-init
COPY --chmod=0755 deploy/retrain.sh /usr/local/bin/xclip-retrain
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/xclip
USER 10001:10001
WORKDIR /data
VOLUME ["/data/bundles", "/data/state", "/data/cache", "/data/runs"]
CMD ["xclip-serve", "--help"]
