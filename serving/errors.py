"""The one error the server answers with: a refused request and its HTTP status."""

from __future__ import annotations


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with ``{"error": message}`` (and ``headers``)."""

    def __init__(self, message: str, status: int = 400, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
