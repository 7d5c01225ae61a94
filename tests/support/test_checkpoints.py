"""The tiny CLIP checkpoint loads like a real one and separates labels and images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, pipeline

from tests.support.checkpoints import (
    END_TOKEN_ID,
    START_TOKEN_ID,
    VOCAB_SIZE,
    build_tiny_clip,
    byte_to_unicode_table,
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def noise_image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


@pytest.fixture(scope="module")
def model(tiny_clip_dir: Path) -> CLIPModel:
    return CLIPModel.from_pretrained(tiny_clip_dir).eval()


def test_byte_table_is_a_bijection() -> None:
    table = byte_to_unicode_table()

    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(character.isprintable() and not character.isspace() for character in table.values())
    assert table[ord("a")] == "a"
    assert table[ord(" ")] == "Ġ"  # the space byte maps to U+0120, as in GPT-2 and CLIP vocabularies


def test_checkpoint_config_matches_clip_geometry(model: CLIPModel) -> None:
    assert model.config.vision_config.image_size == 224
    assert model.config.vision_config.patch_size == 32
    assert model.config.text_config.vocab_size == VOCAB_SIZE
    assert model.config.text_config.max_position_embeddings == 77
    assert model.config.text_config.bos_token_id == START_TOKEN_ID
    assert model.config.text_config.eos_token_id == END_TOKEN_ID
    assert model.config.text_config.pad_token_id == END_TOKEN_ID


def test_tokenizer_wraps_text_in_special_ids(tiny_clip_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)

    input_ids = tokenizer("A cat")["input_ids"]

    assert type(tokenizer).__name__ == "CLIPTokenizer"
    assert input_ids[0] == START_TOKEN_ID
    assert input_ids[-1] == END_TOKEN_ID
    assert tokenizer.convert_ids_to_tokens(input_ids[1:-1]) == ["a</w>", "c", "a", "t</w>"]
    assert tokenizer.model_max_length == 77


def test_image_processor_uses_clip_defaults(tiny_clip_dir: Path) -> None:
    processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)

    pixel_values = processor(images=noise_image(0), return_tensors="pt")["pixel_values"]

    assert processor.size == {"shortest_edge": 224}
    assert processor.crop_size == {"height": 224, "width": 224}
    assert processor.image_mean == pytest.approx(CLIP_MEAN)
    assert processor.image_std == pytest.approx(CLIP_STD)
    assert tuple(pixel_values.shape) == (1, 3, 224, 224)


def test_labels_get_different_text_embeddings(model: CLIPModel, tiny_clip_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    inputs = tokenizer(["a photo of a cat.", "a photo of a dog."], padding=True, return_tensors="pt")

    with torch.inference_mode():
        embeddings = model.get_text_features(**inputs).pooler_output

    assert tuple(embeddings.shape) == (2, 16)
    assert (embeddings[0] - embeddings[1]).abs().max().item() > 1e-3


def test_images_get_different_image_embeddings(model: CLIPModel, tiny_clip_dir: Path) -> None:
    processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    inputs = processor(images=[noise_image(1), Image.new("RGB", (64, 64), (255, 0, 0))], return_tensors="pt")

    with torch.inference_mode():
        embeddings = model.get_image_features(**inputs).pooler_output

    assert tuple(embeddings.shape) == (2, 16)
    assert (embeddings[0] - embeddings[1]).abs().max().item() > 1e-3


def test_pipeline_scores_differ_across_labels(tiny_clip_dir: Path) -> None:
    classifier = pipeline("zero-shot-image-classification", model=str(tiny_clip_dir), device="cpu")

    for image in (noise_image(2), Image.new("RGB", (300, 200), (20, 200, 40))):
        results = classifier(image, candidate_labels=["cat", "dog", "car"])
        scores = [result["score"] for result in results]

        assert sorted(result["label"] for result in results) == ["car", "cat", "dog"]
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)
        assert max(scores) - min(scores) > 1e-3


def test_build_is_deterministic(tiny_clip_dir: Path, tmp_path: Path) -> None:
    first = load_file(str(tiny_clip_dir / "model.safetensors"))
    second = load_file(str(build_tiny_clip(tmp_path) / "model.safetensors"))

    assert sorted(first) == sorted(second)
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
