"""``ApiError``: an error the API answers with an OpenAI-style error body (:func:`serve.openai.error_body`).

Raised by request validation (:mod:`serve.aggregator`) and by the fan-out client (:mod:`serve.fanout`: a
deployment timed out, 504, or failed, 502); the routes turn it into a JSON response or an SSE error event.
"""

from __future__ import annotations


class ApiError(Exception):
    """``status`` (HTTP), ``message`` (names the field or deployment), ``param`` (the request field, if any)
    and ``kind`` (OpenAI's error ``type``)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


__all__ = ["ApiError"]
