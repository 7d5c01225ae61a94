"""Test suite. The package runs before any test module or conftest, so the offline settings below apply
before huggingface_hub is first imported: it reads HF_HUB_OFFLINE once, at import."""

import os

OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(OFFLINE_ENVIRONMENT)
