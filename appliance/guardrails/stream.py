"""Output guardrails over a streamed chat or completions answer, one parsed chunk at a time.

Each choice's text goes through its own pii StreamRedactor (when pii checks output); what it holds back is
released with the choice's finish chunk, or by ``tail`` when the stream ends without one. The first choice's
text is also kept (when moderation or schema_validation checks output) for the checks made at the end.
Configured moderation terms are also looked for as the text passes, in the last few hundred characters of
each choice: a chunk that completes a flagged term is refused before it goes out.
Tool-call arguments are not redacted in streams: they arrive as fragments of JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from appliance.guardrails import policy
from appliance.guardrails.pii import StreamRedactor

# The text a term is looked for in as a stream passes: the whole answer is checked again when it ends.
_RECENT = 512


class StreamGuard:
    __slots__ = ("_block", "_collect", "_guard", "_kinds", "_moderate", "_parts", "_recent", "_redactors",
                 "_template", "_textual")

    def __init__(self, guard: policy.Guard, *, kinds: Collection[str] | None, block: bool, collect: bool,
                 moderate: Callable[[list[str]], list[str]] | None = None) -> None:
        self._guard = guard  # notes a block before it is raised
        self._moderate = moderate  # the configured categories' check, run on each choice's recent text
        self._recent: dict[int, str] = {}
        self._kinds = kinds  # None: pii does not check this answer
        self._block = block
        self._collect = collect
        self._redactors: dict[int, StreamRedactor] = {}
        self._parts: list[str] = []
        self._template: dict[str, Any] | None = None
        self._textual = False  # a completions stream: choices carry "text", not a delta

    @property
    def found(self) -> list[str]:
        """The pii kinds found in the answer so far."""
        kinds: list[str] = []
        for redactor in self._redactors.values():
            kinds += [k for k in redactor.found if k not in kinds]
        return kinds

    @property
    def text(self) -> str:
        """The first choice's text as the client got it (kept only when ``collect``)."""
        return "".join(self._parts)

    def chunk(self, chunk: dict[str, Any]) -> bool:
        """Rewrite one chunk in place; True when it changed. Raises guardrail_blocked (pii in block mode)."""
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return False
        if self._template is None:
            self._template = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
        changed = False
        for choice in choices:
            if isinstance(choice, dict):
                changed = self._choice(choice) or changed
        return changed

    def _choice(self, choice: dict[str, Any]) -> bool:
        index = choice.get("index", 0) if isinstance(choice.get("index"), int) else 0
        delta = choice.get("delta")
        holder, key = (delta, "content") if isinstance(delta, dict) else (choice, "text")
        self._textual = not isinstance(delta, dict)
        text = holder.get(key)
        if not isinstance(text, str):
            text = None
        changed = False
        if self._kinds is not None:
            redactor = self._redactors.get(index)
            if redactor is None:
                redactor = self._redactors[index] = StreamRedactor(self._kinds)
            out = redactor.feed(text) if text else ""
            if choice.get("finish_reason") is not None:
                out += redactor.finish()
            if self._block and redactor.found:
                self._guard.note(policy.PII, policy.BLOCKED)
                raise policy.blocked(policy.PII, "answer", redactor.found)
            if out != (text or ""):
                changed = True
                if out or text is not None:
                    holder[key] = out
            text = out
        if self._moderate is not None and text:
            self._watch(index, text)
        if self._collect and index == 0 and text:
            self._parts.append(text)
        return changed

    def _watch(self, index: int, text: str) -> None:
        recent = (self._recent.get(index, "") + text)[-_RECENT:]
        self._recent[index] = recent
        found = self._moderate([recent])  # type: ignore[misc]
        if found:
            self._guard.note(policy.MODERATION, policy.BLOCKED)
            raise policy.blocked(policy.MODERATION, "answer", found)

    def tail(self) -> list[dict[str, Any]]:
        """Chunks that carry the text still held back (a stream that ended without a finish chunk)."""
        out = []
        for index, redactor in self._redactors.items():
            rest = redactor.finish()
            if self._block and redactor.found:
                self._guard.note(policy.PII, policy.BLOCKED)
                raise policy.blocked(policy.PII, "answer", redactor.found)
            if rest:
                if self._collect and index == 0:
                    self._parts.append(rest)
                choice = {"index": index, "text": rest} if self._textual else {"index": index,
                                                                                "delta": {"content": rest}}
                out.append({**(self._template or {}), "choices": [{**choice, "finish_reason": None}]})
        return out
