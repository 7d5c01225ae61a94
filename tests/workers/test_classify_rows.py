"""Result rows from embeddings: single-label softmax, multi-label cosine similarities and the score threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from producer.spec import JobSpec, build_spec
from workers.classify import encode_images, label_embeddings, score, top_k_rows
from workers.images import decode_image
from workers.model import LoadedModel, load_model
from workers.rows import build_result_rows

DATA = Path(__file__).resolve().parents[1] / "data"
PHOTOS = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
LABELS = ["cat", "rocket", "coffee cup", "astronaut", "dog"]
URIS = [f"s3://input-bucket/{name}" for name in PHOTOS]
COSINE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def loaded(tiny_clip_dir: Path) -> LoadedModel:
    return load_model(str(tiny_clip_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def embeddings(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Normalised image embeddings of the test photos and label embeddings of LABELS, computed once."""
    images = [decode_image((DATA / name).read_bytes(), max_pixels=10_000_000) for name in PHOTOS]
    pixels = np.stack([loaded.processor(images=image, return_tensors="np")["pixel_values"][0] for image in images])
    return {"images": encode_images(loaded, pixels), "labels": label_embeddings(loaded, make_spec().prompts)}


def make_spec(**fields: Any) -> JobSpec:
    return build_spec(source="s3://input-bucket/", labels=LABELS, output="s3://output-bucket/", **fields)


def rows_for(loaded: LoadedModel, embeddings: dict[str, torch.Tensor], spec: JobSpec) -> list[dict[str, Any]]:
    return build_result_rows(URIS, embeddings["images"], embeddings["labels"], spec, loaded.logit_scale)


def raw_cosines(loaded: LoadedModel, images: list[Image.Image]) -> torch.Tensor:
    """Cosine similarities `[images, labels]` computed straight from the model, without the worker's code."""
    prompts = [f"a photo of a {label}." for label in LABELS]
    with torch.inference_mode():
        text = loaded.model.get_text_features(**loaded.tokenizer(prompts, padding=True, return_tensors="pt")).pooler_output
        pixels = loaded.processor(images=images, return_tensors="pt")["pixel_values"]
        image = loaded.model.get_image_features(pixel_values=pixels).pooler_output
    text = text / text.norm(dim=-1, keepdim=True)
    image = image / image.norm(dim=-1, keepdim=True)
    return image @ text.T


def test_default_rows_equal_softmax_top_k(loaded: LoadedModel, embeddings: dict[str, torch.Tensor]) -> None:
    probabilities = score(embeddings["images"], embeddings["labels"], loaded.logit_scale)
    expected = top_k_rows(probabilities, LABELS, 3)
    rows = rows_for(loaded, embeddings, make_spec(top_k=3))
    assert [row["uri"] for row in rows] == URIS
    assert [row["top_k"] for row in rows] == expected
    assert [row["label"] for row in rows] == [top[0]["label"] for top in expected]
    assert [row["score"] for row in rows] == [top[0]["score"] for top in expected]
    assert all(row["error"] is None for row in rows)


def test_threshold_drops_low_entries(loaded: LoadedModel, embeddings: dict[str, torch.Tensor]) -> None:
    probabilities = score(embeddings["images"], embeddings["labels"], loaded.logit_scale)
    full = top_k_rows(probabilities, LABELS, len(LABELS))
    # Between the best and second-best probability of the first image, so that image keeps one entry.
    threshold = (full[0][0]["score"] + full[0][1]["score"]) / 2
    rows = rows_for(loaded, embeddings, make_spec(top_k=len(LABELS), threshold=threshold))
    for row, top in zip(rows, full):
        assert row["top_k"] == [entry for entry in top if entry["score"] >= threshold]
    assert rows[0]["top_k"] == [full[0][0]]
    assert rows[0]["label"] == full[0][0]["label"]


def test_threshold_above_best_nulls_label(loaded: LoadedModel, embeddings: dict[str, torch.Tensor]) -> None:
    probabilities = score(embeddings["images"], embeddings["labels"], loaded.logit_scale)
    threshold = float(probabilities.max()) + 1e-6
    rows = rows_for(loaded, embeddings, make_spec(threshold=threshold))
    for row in rows:
        assert row["label"] is None
        assert row["score"] is None
        assert row["top_k"] == []
        assert row["error"] is None


def test_threshold_equal_to_score_kept(loaded: LoadedModel, embeddings: dict[str, torch.Tensor]) -> None:
    best = top_k_rows(score(embeddings["images"], embeddings["labels"], loaded.logit_scale), LABELS, 1)[0][0]
    rows = rows_for(loaded, embeddings, make_spec(threshold=best["score"]))
    assert rows[0]["label"] == best["label"]
    assert rows[0]["score"] == best["score"]


def test_multi_label_scores_are_raw_cosines(loaded: LoadedModel, embeddings: dict[str, torch.Tensor]) -> None:
    images = [decode_image((DATA / name).read_bytes(), max_pixels=10_000_000) for name in PHOTOS]
    expected = raw_cosines(loaded, images)
    rows = rows_for(loaded, embeddings, make_spec(multi_label=True, top_k=len(LABELS)))
    for row, cosines in zip(rows, expected):
        by_label = {entry["label"]: entry["score"] for entry in row["top_k"]}
        assert sorted(by_label) == sorted(LABELS)
        for label, cosine in zip(LABELS, cosines.tolist()):
            assert by_label[label] == pytest.approx(cosine, abs=COSINE_TOLERANCE)


def test_multi_label_top_k_sorted(loaded: LoadedModel, embeddings: dict[str, torch.Tensor]) -> None:
    rows = rows_for(loaded, embeddings, make_spec(multi_label=True, top_k=3))
    for row in rows:
        scores = [entry["score"] for entry in row["top_k"]]
        assert len(scores) == 3
        assert scores == sorted(scores, reverse=True)
        assert row["label"] == row["top_k"][0]["label"]
        assert row["score"] == scores[0]


def test_multi_label_scores_not_softmax(loaded: LoadedModel, embeddings: dict[str, torch.Tensor]) -> None:
    rows = rows_for(loaded, embeddings, make_spec(multi_label=True, top_k=len(LABELS)))
    sums = [sum(entry["score"] for entry in row["top_k"]) for row in rows]
    assert all(abs(total - 1.0) > 1e-3 for total in sums)


def test_multi_label_threshold_filters(loaded: LoadedModel, embeddings: dict[str, torch.Tensor]) -> None:
    cosines = embeddings["images"] @ embeddings["labels"].T
    threshold = float(cosines.median())
    rows = rows_for(loaded, embeddings, make_spec(multi_label=True, top_k=len(LABELS), threshold=threshold))
    for row, image_cosines in zip(rows, cosines):
        expected = sorted(LABELS[index] for index, value in enumerate(image_cosines.tolist()) if value >= threshold)
        assert sorted(entry["label"] for entry in row["top_k"]) == expected
    assert any(len(row["top_k"]) < len(LABELS) for row in rows)


def test_multi_label_threshold_nulls_label(loaded: LoadedModel, embeddings: dict[str, torch.Tensor]) -> None:
    cosines = embeddings["images"] @ embeddings["labels"].T
    # Between the lowest and highest best cosine, so at least one image keeps a label and one loses it.
    best = cosines.max(dim=1).values
    threshold = float(best.min() + best.max()) / 2
    rows = rows_for(loaded, embeddings, make_spec(multi_label=True, threshold=threshold))
    for row, image_best in zip(rows, best.tolist()):
        if image_best >= threshold:
            assert row["score"] == pytest.approx(image_best, abs=COSINE_TOLERANCE)
        else:
            assert (row["label"], row["score"], row["top_k"]) == (None, None, [])
    assert {row["label"] is None for row in rows} == {True, False}


def test_uris_and_embeddings_must_match() -> None:
    with pytest.raises(ValueError, match="2 URIs for 1 image embeddings"):
        build_result_rows(["a", "b"], torch.ones(1, 4), torch.ones(5, 4), make_spec(), 100.0)
