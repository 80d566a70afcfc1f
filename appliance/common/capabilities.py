"""What a backend can serve, as ``[[backends]] capabilities`` names it, and each kind's default.

An endpoint needs one capability (providers/base.py CAPABILITY_OF). "audio" in a config stands for
transcriptions (which covers translations) and speech.
"""

from __future__ import annotations

NAMES = ("chat", "completions", "embeddings", "rerank", "moderations", "images", "transcriptions", "speech")
GROUPS = {"audio": ("transcriptions", "speech")}

_OPENAI_ONES = frozenset(("chat", "completions", "embeddings", "moderations", "images", "transcriptions", "speech"))

# What a backend serves when its config does not say, by kind (the server it turned out to be; an OpenAI-
# compatible backend's kind is learned from its model list).
DEFAULTS: dict[str, frozenset[str]] = {
    "ollama": frozenset(("chat", "completions", "embeddings")),
    "anthropic": frozenset(("chat",)),
    "vllm": frozenset(("chat", "completions", "embeddings", "rerank", "transcriptions")),
    "llamacpp": frozenset(("chat", "completions", "embeddings", "rerank")),
    "llama-cpp-python": frozenset(("chat", "completions", "embeddings")),
    "lmstudio": frozenset(("chat", "completions", "embeddings")),
    "sglang": frozenset(("chat", "completions", "embeddings", "rerank")),
    "openai": _OPENAI_ONES,  # OpenAI itself, or a server that did not say what it is
}


def known(name: str) -> bool:
    return name in NAMES or name in GROUPS


def of(configured: list[str] | None, kind: str) -> frozenset[str]:
    """A backend's capabilities: as configured (groups expanded), else its kind's default."""
    if configured is None:
        return DEFAULTS.get(kind, _OPENAI_ONES)
    out: set[str] = set()
    for name in configured:
        out.update(GROUPS.get(name, (name,)))
    return frozenset(out)
