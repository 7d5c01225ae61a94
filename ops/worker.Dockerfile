# CPU image for clipfleet workers. Build it from the repository root:
#   docker build -f ops/worker.Dockerfile -t clipfleet-worker:cpu .
# docker-compose.yml builds it as the `worker` service.
# ops/worker-cuda.Dockerfile is the GPU variant, and ops/producer.Dockerfile the image without torch.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Install the CPU build of torch first. The project only requires torch>=2.3, which this
# satisfies, so the next step keeps it instead of pulling the much larger default CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY producer ./producer
COPY workers ./workers
RUN pip install .

# Hugging Face downloads model weights to /root/.cache/huggingface. docker-compose.yml mounts
# a named volume there, so the weights survive container restarts.
ENTRYPOINT ["clipfleet"]
CMD ["worker"]
