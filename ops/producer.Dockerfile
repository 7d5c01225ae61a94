# Image for the clipfleet producer commands (submit, status, wait, results, retry, compact, ...) and the HTTP
# API (`clipfleet serve`), without torch or transformers. Build it from the repository root:
#   docker build -f ops/producer.Dockerfile -t clipfleet-producer .
#   docker run --rm -e CLIPFLEET_REDIS_URL=redis://redis.internal:6379/0 clipfleet-producer status JOB_ID
#   docker run --rm -p 127.0.0.1:8000:8000 -e CLIPFLEET_REDIS_URL=... clipfleet-producer serve --host 0.0.0.0 --port 8000
#
# `import producer` never imports torch, but the project's dependencies include torch and transformers for
# the workers. So the project is installed with `pip install --no-deps .`, after the packages that the
# producer imports, listed here by hand. Only producer/ is copied, so `clipfleet worker` and `clipfleet run`
# (which starts a worker) do not work in this image. huggingface_hub and tokenizers read a model's
# tokenizer at submit, to warn about prompts that the workers would truncate. fastapi, uvicorn and
# python-multipart serve the HTTP API, which holds no model: the workers compute every embedding.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

RUN pip install "boto3>=1.34" "celery[redis]>=5.4" "numpy>=1.26" "pillow>=10" "pyarrow>=15" "scikit-learn>=1.4" "pydantic>=2.7" "pydantic-settings>=2.3" \
    "redis>=5.0" "huggingface_hub>=1.0" "tokenizers>=0.20" "fastapi>=0.115" "uvicorn>=0.30" "python-multipart>=0.0.9"

COPY pyproject.toml README.md ./
COPY producer ./producer
RUN pip install --no-deps .

# Fail the build if torch or transformers came in through a dependency after all.
RUN python -c "import importlib.util, sys; found = [m for m in ('torch', 'transformers') if importlib.util.find_spec(m)]; sys.exit(f'unexpected packages: {found}' if found else 0)"

# The port that docker-compose.yml and k8s/api-deployment.yaml give `clipfleet serve --port`. Only documentation:
# the server listens where --host and --port say.
EXPOSE 8000

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin clipfleet
USER 10001

ENTRYPOINT ["clipfleet"]
CMD ["--help"]
