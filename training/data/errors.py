"""Errors raised by the data loaders."""

from __future__ import annotations

__all__ = ["DataSourceError"]


class DataSourceError(ValueError):
    """A data source (path, archive, batch file or image) is missing or malformed.

    The message always names the offending path, archive member or file.
    Subclasses :class:`ValueError` so callers that validate user input
    (e.g. the HTTP service) can map it to a 4xx response.
    """
