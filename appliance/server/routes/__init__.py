"""Thin handlers: parse, call the pipeline, render."""

from __future__ import annotations

from typing import Any

from sanic import Blueprint

_READ = frozenset(("GET", "HEAD"))


class Routes(Blueprint):
    """A Blueprint whose GET routes answer HEAD too: the same status and headers, no body (RFC 9110 9.3.2).

    Sanic routes HEAD only where a route names it, and leaves out the body of any answer to a HEAD itself.
    """

    def get(self, uri: str, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("ignore_body", True)  # what Blueprint.get does: a GET's body is not read
        return self.route(uri, *args, methods=_READ, **kwargs)
