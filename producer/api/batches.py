"""Routes of the HTTP API (being written)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter

from producer.api.state import ApiState

router = APIRouter()


def start_background(state: ApiState) -> Callable[[], None]:
    """Start the threads that drive batches; return the function that stops them."""
    return lambda: None
