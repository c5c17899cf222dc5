"""The OpenAI-compatible HTTP server (``bucketserve serve``)."""

from bucketserve.server.app import build_app

__all__ = ["build_app"]
