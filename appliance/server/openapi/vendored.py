"""The vendored part of OpenAI's OpenAPI spec (openai.json beside this module; see build/vendor_openapi.py)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

VENDORED_FILE = Path(__file__).with_name("openai.json")


@dataclass(frozen=True, slots=True)
class OpenAISpec:
    """OpenAI's operations ("POST /v1/chat/completions" -> operation) and the components they reference."""

    source: dict[str, Any]
    operations: dict[str, dict[str, Any]]
    components: dict[str, dict[str, Any]]

    def operation(self, method: str, path: str) -> dict[str, Any]:
        """A copy of one operation: the caller may reshape it."""
        return copy.deepcopy(self.operations[f"{method.upper()} {path}"])


def load(path: Path = VENDORED_FILE) -> OpenAISpec:
    data = orjson.loads(path.read_bytes())
    return OpenAISpec(source=data["source"], operations=data["operations"], components=data["components"])
