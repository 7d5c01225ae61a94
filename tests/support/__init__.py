"""Helpers for the test suite: real servers on loopback ports and a tiny CLIP checkpoint."""
