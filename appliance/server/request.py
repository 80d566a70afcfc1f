"""Sanic's Request, able to take a request line whose URL holds a control character.

httptools refuses such a URL, and Sanic then fails to build even the stand-in request it answers errors
with: the connection drops without an answer, and a traceback lands in the log. Here the control
characters are percent-escaped instead (as a careful client would have sent them) and the request is
answered by the usual rules: 404 for an unknown path, 400 where the escape is refused (/proxy/...).
Only a URL that failed pays for this.
"""

from __future__ import annotations

import re
from typing import Any

from sanic import Request
from sanic.exceptions import BadURL

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def _escaped(match: re.Match[bytes]) -> bytes:
    return b"%%%02X" % match.group()[0]


class GatewayRequest(Request):
    __slots__ = ()

    def __init__(self, url_bytes: bytes, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(url_bytes, *args, **kwargs)
        except BadURL:
            escaped = _CONTROL.sub(_escaped, url_bytes)
            if escaped == url_bytes:
                raise
            super().__init__(escaped, *args, **kwargs)
