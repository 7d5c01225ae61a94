"""Scores against the reference: transformers' zero-shot image classification pipeline on the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from producer.spec import build_spec
from workers.classify import encode_images, label_embeddings, score, top_k_rows
from workers.images import decode_image
from workers.model import LoadedModel, load_model

DATA = Path(__file__).resolve().parents[1] / "data"
PHOTOS = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
LABELS = ["cat", "rocket", "coffee cup", "astronaut", "dog"]
TEMPLATE = "a photo of a {}."
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def loaded(tiny_clip_dir: Path) -> LoadedModel:
    return load_model(str(tiny_clip_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference(tiny_clip_dir: Path):
    return pipeline("zero-shot-image-classification", model=str(tiny_clip_dir), device="cpu")


def photo(name: str) -> Image.Image:
    return decode_image((DATA / name).read_bytes(), max_pixels=10_000_000)


def our_scores(loaded: LoadedModel, images: list[Image.Image], labels: list[str], templates: list[str]) -> np.ndarray:
    spec = build_spec(source="s3://input-bucket/", labels=labels, templates=templates, output="s3://output-bucket/")
    text = label_embeddings(loaded, spec.prompts)
    pixels = np.stack([loaded.processor(images=image, return_tensors="np")["pixel_values"][0] for image in images])
    return score(encode_images(loaded, pixels), text, loaded.logit_scale).numpy()


def reference_scores(reference, image: Image.Image, labels: list[str], template: str) -> np.ndarray:
    output = reference(image, candidate_labels=labels, hypothesis_template=template)
    by_label = {item["label"]: item["score"] for item in output}
    return np.array([by_label[label] for label in labels])


@pytest.mark.parametrize("name", PHOTOS)
def test_single_image_matches_pipeline(loaded: LoadedModel, reference, name: str) -> None:
    image = photo(name)
    ours = our_scores(loaded, [image], LABELS, [TEMPLATE])[0]
    expected = reference_scores(reference, image, LABELS, TEMPLATE)
    assert np.abs(ours - expected).max() < TOLERANCE


def test_mixed_size_batch_matches_pipeline(loaded: LoadedModel, reference) -> None:
    images = [photo(name) for name in PHOTOS]
    sizes = {image.size for image in images}
    assert len(sizes) > 1, "the batch must mix image sizes"
    ours = our_scores(loaded, images, LABELS, [TEMPLATE])
    for row, image in zip(ours, images):
        expected = reference_scores(reference, image, LABELS, TEMPLATE)
        assert np.abs(row - expected).max() < TOLERANCE


def test_batch_equals_single_images(loaded: LoadedModel) -> None:
    images = [photo(name) for name in PHOTOS]
    batched = our_scores(loaded, images, LABELS, [TEMPLATE])
    singles = np.stack([our_scores(loaded, [image], LABELS, [TEMPLATE])[0] for image in images])
    assert np.abs(batched - singles).max() < TOLERANCE


def test_scores_differ_across_labels(loaded: LoadedModel) -> None:
    scores = our_scores(loaded, [photo("chelsea.jpg")], LABELS, [TEMPLATE])[0]
    assert scores.max() - scores.min() > 1e-3


def test_scores_differ_across_images(loaded: LoadedModel) -> None:
    scores = our_scores(loaded, [photo(name) for name in PHOTOS], LABELS, [TEMPLATE])
    assert np.abs(scores[0] - scores[1]).max() > 1e-3
    assert np.abs(scores[2] - scores[3]).max() > 1e-3


def test_scores_sum_to_one(loaded: LoadedModel) -> None:
    scores = our_scores(loaded, [photo(name) for name in PHOTOS], LABELS, [TEMPLATE])
    assert np.allclose(scores.sum(axis=1), 1.0, atol=1e-5)


def test_ensemble_uses_normalised_mean(loaded: LoadedModel) -> None:
    templates = ["a photo of a {}.", "a blurry photo of a {}.", "art of the {}."]
    spec = build_spec(source="s3://input-bucket/", labels=["cat", "dog"], templates=templates, output="s3://output-bucket/")
    embeddings = label_embeddings(loaded, spec.prompts)
    for row, label in zip(embeddings, ["cat", "dog"]):
        prompts = [template.replace("{}", label) for template in templates]
        tokens = loaded.tokenizer(prompts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            features = loaded.model.get_text_features(**tokens).pooler_output
        features = features / features.norm(dim=-1, keepdim=True)
        mean = features.mean(dim=0)
        assert torch.allclose(row, mean / mean.norm(), atol=1e-6)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-6)


def test_top_k_sorted_and_capped() -> None:
    probabilities = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    rows = top_k_rows(probabilities, ["a", "b", "c"], k=5)
    assert [item["label"] for item in rows[0]] == ["b", "c", "a"]
    assert [item["label"] for item in rows[1]] == ["a", "c", "b"]
    assert rows[0][0]["score"] == pytest.approx(0.6)


def test_top_k_one() -> None:
    rows = top_k_rows(torch.tensor([[0.2, 0.8]]), ["a", "b"], k=1)
    assert rows == [[{"label": "b", "score": pytest.approx(0.8)}]]


def test_bfloat16_autocast_close_to_float32(tiny_clip_dir: Path, loaded: LoadedModel) -> None:
    low = load_model(str(tiny_clip_dir), device="cpu", dtype="bfloat16")
    images = [photo(name) for name in PHOTOS]
    full = our_scores(loaded, images, LABELS, [TEMPLATE])
    reduced = our_scores(low, images, LABELS, [TEMPLATE])
    assert np.abs(full - reduced).max() < 0.05
