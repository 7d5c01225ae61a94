"""Build a tiny random-weight CLIP checkpoint that loads like a real one, for offline tests.

The checkpoint has real CLIP architecture and preprocessing (224x224 input, OpenAI CLIP mean and
std) but only about 154 thousand parameters, so it builds in a few seconds on a CPU. Its scores
mean nothing, but they differ between labels and between images, so equality checks against
``transformers.pipeline("zero-shot-image-classification")`` do not pass vacuously
(tests/support/test_checkpoints.py checks this).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPTokenizer,
    CLIPVisionConfig,
)

logger = logging.getLogger(__name__)

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD_SUFFIX = "</w>"

# 256 byte-level characters, their 256 end-of-word forms, then the two special tokens.
START_TOKEN_ID = 512
END_TOKEN_ID = 513
VOCAB_SIZE = 514

MAX_TEXT_TOKENS = 77  # CLIP's text context length
IMAGE_SIZE_PX = 224
PATCH_SIZE_PX = 32
HIDDEN_SIZE = 32
PROJECTION_DIM = 16
SEED = 0


def byte_to_unicode_table() -> dict[int, str]:
    """Return the byte-level BPE alphabet: one printable character for each byte value 0-255.

    Bytes that are already printable, non-space Latin-1 characters map to themselves. Every
    other byte (control characters, space, DEL, NBSP, soft hyphen) maps to the next unused code
    point from U+0100 upward, in byte order. This is the mapping that GPT-2 and CLIP
    tokenizers use, so ``pre_tokenizers.ByteLevel`` output matches this vocabulary.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))

    table: dict[int, str] = {}
    next_code_point = 256
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(next_code_point)
            next_code_point += 1
    return table


def build_vocabulary() -> dict[str, int]:
    """Return a merge-free CLIP vocabulary: every byte character, its ``</w>`` form, then the specials."""
    characters = list(byte_to_unicode_table().values())
    tokens = characters + [character + END_OF_WORD_SUFFIX for character in characters]
    tokens += [START_TOKEN, END_TOKEN]
    vocabulary = {token: token_id for token_id, token in enumerate(tokens)}

    if vocabulary[START_TOKEN] != START_TOKEN_ID or vocabulary[END_TOKEN] != END_TOKEN_ID:
        raise RuntimeError(f"special token ids moved: {vocabulary[START_TOKEN]}, {vocabulary[END_TOKEN]}")
    return vocabulary


def build_config() -> CLIPConfig:
    """Return a CLIP config with two-layer, 32-wide towers and the real 224 px / 32 px patch geometry."""
    # The text tower pools at the first eos_token_id in each sequence, so the special token ids
    # must be the ones in this vocabulary. With CLIP's defaults (49406, 49407) no token matches
    # and every prompt pools the same position, which gives every label the same score.
    text_config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=2 * HIDDEN_SIZE,
        projection_dim=PROJECTION_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TEXT_TOKENS,
        bos_token_id=START_TOKEN_ID,
        eos_token_id=END_TOKEN_ID,
        pad_token_id=END_TOKEN_ID,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=HIDDEN_SIZE,
        intermediate_size=2 * HIDDEN_SIZE,
        projection_dim=PROJECTION_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE_PX,
        patch_size=PATCH_SIZE_PX,
    )
    return CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=PROJECTION_DIM,
    )


def save_tokenizer(directory: Path) -> None:
    """Write ``vocab.json`` and an empty ``merges.txt``, load them as a CLIPTokenizer and save it."""
    vocabulary_json = json.dumps(build_vocabulary(), ensure_ascii=False)
    (directory / "vocab.json").write_text(vocabulary_json, encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")

    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=MAX_TEXT_TOKENS)
    if tokenizer.eos_token_id != END_TOKEN_ID or tokenizer.bos_token_id != START_TOKEN_ID:
        raise RuntimeError(
            f"tokenizer special ids are bos={tokenizer.bos_token_id} eos={tokenizer.eos_token_id}, "
            f"expected bos={START_TOKEN_ID} eos={END_TOKEN_ID}"
        )
    tokenizer.save_pretrained(str(directory))


def build_tiny_clip(directory: Path) -> Path:
    """Save a tiny random CLIP checkpoint (safetensors weights, tokenizer, image processor) into directory.

    The directory is created if missing, and files already in it are overwritten. The weights
    depend only on the seed, so two builds give equal tensors. The global torch RNG state is
    restored afterwards. Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = CLIPModel(build_config())
    model.save_pretrained(str(directory))

    save_tokenizer(directory)
    CLIPImageProcessorPil().save_pretrained(str(directory))

    logger.info("built tiny CLIP checkpoint in %s", directory)
    return directory
