# GPU image for clipfleet workers. Build it from the repository root:
#   docker build -f ops/worker-cuda.Dockerfile -t clipfleet-worker:cuda .
#
# torch 2.13.0's Linux x86_64 wheel on PyPI is its CUDA 13.0 build: it requires the cuda-toolkit 13.0.3
# wheels, which bring their own CUDA libraries. The base image matches that CUDA version and sets the
# variables (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES) that the NVIDIA container runtime reads.
# The driver comes from the node and must support CUDA 13.0. `nvidia-smi` on the node prints the highest
# CUDA version its driver supports.
#
# Model weights, two ways. Both leave the checkpoint in /models/clip, which CLIPFLEET_MODEL points to:
# - Baked in (the default): the build runs `hf download MODEL_ID` into /models/clip, so a new pod starts
#   without reaching the Hugging Face hub. Choose the checkpoint with
#   `--build-arg MODEL_ID=openai/clip-vit-large-patch14 --build-arg MODEL_REVISION=<commit>`.
# - Mounted: build with `--build-arg MODEL_ID=` (empty) to skip the download, and mount a volume that
#   contains the checkpoint folder (from `hf download REPO --local-dir DIR`) read-only at /models/clip.
#   ops/k8s/worker-deployment.yaml shows where the volume goes.
# Setting CLIPFLEET_MODEL to a hub id instead makes each worker download the model at start.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive

# Ubuntu 24.04 ships Python 3.12 and marks its system Python as externally managed (PEP 668), so the
# project goes into a virtual environment.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app

# torch first, pinned, so `pip install .` below keeps this build instead of resolving torch again.
RUN pip install torch==2.13.0

COPY pyproject.toml README.md ./
COPY producer ./producer
COPY workers ./workers
RUN pip install .

# The download comes after the project, so changing the model rebuilds only this layer. The TensorFlow
# and Flax weights that some hub repositories also contain are not used by the workers.
ARG MODEL_ID=openai/clip-vit-base-patch32
ARG MODEL_REVISION=main
RUN if [ -n "$MODEL_ID" ]; then \
        hf download "$MODEL_ID" --revision "$MODEL_REVISION" --local-dir /models/clip \
            --exclude "*.h5" --exclude "*.msgpack" --exclude "*.onnx" \
        && rm -rf /models/clip/.cache; \
    fi

# The workers run as an unprivileged user with a fixed id, which the Deployment's securityContext names.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin clipfleet
USER 10001

ENV CLIPFLEET_MODEL=/models/clip \
    CLIPFLEET_DEVICE=cuda

ENTRYPOINT ["clipfleet"]
CMD ["worker"]
