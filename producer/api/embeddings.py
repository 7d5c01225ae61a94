"""Routes of the HTTP API (being written)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
