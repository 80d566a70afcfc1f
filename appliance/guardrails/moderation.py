"""content_moderation: configured terms and regexes per category, and the verdict of a moderation model.

A term matches as a whole word (or words: any whitespace between them), in any case; an entry written
``re:<pattern>`` is a regular expression, matched as written. Each category's entries are compiled once, per
config: its terms into one pattern, each regex on its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

REGEX_PREFIX = "re:"


def _term(term: str) -> str:
    return r"\s+".join(re.escape(word) for word in term.split())


class Moderator:
    """The configured categories, compiled."""

    __slots__ = ("_patterns",)

    def __init__(self, categories: Mapping[str, Iterable[str]]) -> None:
        self._patterns: list[tuple[str, re.Pattern[str]]] = []
        for name, entries in categories.items():
            entries = list(entries)
            terms = [_term(e) for e in entries if not e.startswith(REGEX_PREFIX) and e.strip()]
            regexes = [e[len(REGEX_PREFIX):] for e in entries if e.startswith(REGEX_PREFIX)]
            if terms:
                self._patterns.append((name, re.compile(rf"(?<!\w)(?:{'|'.join(terms)})(?!\w)", re.IGNORECASE)))
            # One pattern each: a regex may open with its own flags ("(?i)..."), which cannot be joined.
            self._patterns += [(name, re.compile(regex)) for regex in regexes]

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def flagged(self, texts: Iterable[str]) -> list[str]:
        """The categories any of ``texts`` falls in, in config order."""
        texts = list(texts)
        found: list[str] = []
        for name, pattern in self._patterns:
            if name not in found and any(pattern.search(text) for text in texts):
                found.append(name)
        return found


def model_verdict(data: Any) -> list[str]:
    """The categories a /v1/moderations answer flags (``flagged`` when it names none); [] when nothing is.

    Raises ValueError for an answer that is not one.
    """
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        raise ValueError("no 'results' list")
    found: list[str] = []
    for result in results:
        if not isinstance(result, dict) or not result.get("flagged"):
            continue
        categories = result.get("categories")
        named = [c for c, on in categories.items() if on is True] if isinstance(categories, dict) else []
        found += [c for c in named or ["flagged"] if c not in found]
    return found
