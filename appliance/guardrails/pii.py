"""Personal data and secrets in text: find, redact, and redact a stream as it passes.

Kinds: ``email``, ``phone``, ``card`` (Luhn-checked), ``iban`` (mod-97 checksum), ``ip`` (IPv4/IPv6, checked
with the ipaddress module) and ``secret`` (API-key-looking tokens, bearer tokens, private key blocks).

Cost: every pattern is compiled once, at import. One regex pass finds the runs of digits long enough to be a
card, phone, IBAN or IPv4 address, and those four patterns read only the text around them; the others run only
when the text holds what they need (``@``, ``::``, ``sk-``, ``-----BEGIN``...). A 4 kB prompt is scanned in
about 0.1 ms of CPU (tests/perf/guardrails.py).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Collection, Iterator
from typing import NamedTuple

KINDS = ("email", "phone", "card", "iban", "ip", "secret")
LABELS = {kind: f"[{kind.upper()}]" for kind in KINDS}
# Which kind wins when two matches start at the same place and are as long (a 16-digit run: card, not phone).
_RANK = {kind: i for i, kind in enumerate(("secret", "email", "card", "iban", "ip", "phone"))}


class Hit(NamedTuple):
    start: int
    end: int
    kind: str


# ------------------------------------------------------------------------------------------ the patterns
# Each digit pattern starts by consuming a character and only then looks behind (``\d(?<!\w\d)``): a pattern
# that opens with a lookbehind loses the engine's skip-to-a-possible-first-character, and costs more.

# The domain after an '@'; the local part is walked back by hand (a pattern that starts at every word would
# try every word of the text).
_EMAIL_DOMAIN = re.compile(r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                           r"[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![A-Za-z0-9-])")
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_MAX_LOCAL = 64

# 13 to 19 digits, single spaces or dashes between them allowed.
_CARD = re.compile(r"\d(?<![\d\w]\d)(?:[ -]?\d){12,18}(?!\d)")
# International (+ and 8-15 digits, groups apart) and North American ((555) 123-4567, 555-123-4567) numbers.
_PHONE = re.compile(r"\+(?<![\w+]\+)\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?![\d])"
                    r"|\((?<![\w(]\()\d{3}\)[ .-]?\d{3}[ .-]\d{4}(?!\d)"
                    r"|\d(?<![\w.+-]\d)\d{2}[.-]\d{3}[.-]\d{4}(?![\d-]|\.\d)")
# Country code, check digits, then groups of four letters or digits, compact or one space apart (as printed).
_IBAN = re.compile(r"[A-Z](?<![\w][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Za-z0-9])")
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
# Each pattern runs only when the text holds what it starts with (tested in _secrets: a one-character test costs
# a tenth of a longer one, and most prefixes hold a '-' or a '_').
_SK = re.compile(r"(?<![\w-])sk-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_]{20,}(?:-[A-Za-z0-9_]+)*")
_GITHUB = re.compile(r"(?<![\w-])(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})")
_AWS_GOOGLE = re.compile(r"A(?<![\w-]A)(?:(?:KIA|SIA)[0-9A-Z]{16}(?![0-9A-Za-z])|Iza[0-9A-Za-z_-]{35})")
_SLACK = re.compile(r"(?<![\w-])xox[abposr]-[A-Za-z0-9-]{10,}")
_GITLAB = re.compile(r"(?<![\w-])glpat-[A-Za-z0-9_-]{20,}")
_BEARER = re.compile(r"(?<![\w-])(?:[Bb]earer|BEARER)[ \t]+[A-Za-z0-9._~+/=-]{16,}")
_KEY_BLOCK = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----")
_AWS_GOOGLE_START = re.compile(r"A(?:KIA|SIA|Iza)")


def _emails(text: str, _windows: Windows) -> Iterator[Hit]:
    if "@" not in text:
        return
    for m in _EMAIL_DOMAIN.finditer(text):
        at = start = m.start()
        while start > 0 and at - start < _MAX_LOCAL and text[start - 1] in _LOCAL_CHARS:
            start -= 1
        while start < at and text[start] in ".-+%":  # a local part starts with a letter, digit or underscore
            start += 1
        if start < at:
            yield Hit(start, m.end(), "email")


# Cards, phones and IBANs each hold a run of at least eight digits (separators between them allowed), an IPv4
# address four digits and three dots: one scan finds such runs, and those patterns only read the text around them.
_STRETCH = re.compile(r"[0-9][0-9 .()+/-]{6,}")  # seven characters at least: shorter runs are none of them
_MARGIN = 44  # the longest of those matches
_LONG_RUN = 8


class Windows(NamedTuple):
    """The stretches of a text (start, end), merged and in order, that the digit patterns need to read."""

    long: list[tuple[int, int]]  # around runs of 8 digits or more: cards, phones, IBANs
    dotted: list[tuple[int, int]]  # around runs with 4 digits and 3 dots: IPv4 addresses


def _add(windows: list[tuple[int, int]], start: int, end: int) -> None:
    if windows and start <= windows[-1][1]:
        windows[-1] = (windows[-1][0], end)
    else:
        windows.append((start, end))


def numeric_windows(text: str) -> Windows:
    found = Windows([], [])
    size = len(text)
    for m in _STRETCH.finditer(text):
        run = m.group()
        digits = sum(ch.isdigit() for ch in run)
        if digits >= _LONG_RUN:
            _add(found.long, max(0, m.start() - _MARGIN), min(size, m.end() + _MARGIN))
        if digits >= 4 and run.count(".") >= 3:
            _add(found.dotted, max(0, m.start() - 2), min(size, m.end() + 2))
    return found


def _colon_windows(text: str) -> list[tuple[int, int]]:
    """Around each "::", and each run of seven colons within an address's length: where IPv6 may be."""
    colons = []
    at = text.find(":")
    while at != -1:
        colons.append(at)
        at = text.find(":", at + 1)
    windows: list[tuple[int, int]] = []
    for i, at in enumerate(colons):
        if text.startswith("::", at) or (i + 6 < len(colons) and colons[i + 6] - at <= 39):
            _add(windows, max(0, at - 40), min(len(text), at + 42))
    return windows


def _in(pattern: re.Pattern[str], text: str, windows: list[tuple[int, int]]) -> Iterator[re.Match[str]]:
    for start, end in windows:
        yield from pattern.finditer(text, start, end)  # lookbehinds still see the text before ``start``


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = ord(ch) - 48
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _cards(text: str, windows: Windows) -> Iterator[Hit]:
    for m in _in(_CARD, text, windows.long):
        span = m.group()
        # The longest run may swallow a following group ("4111 1111 1111 1111 12"): try shorter ends at separators.
        for end in _group_ends(span):
            digits = span[:end].replace(" ", "").replace("-", "")
            if 13 <= len(digits) <= 19 and _luhn(digits):
                yield Hit(m.start(), m.start() + end, "card")
                break


def _group_ends(span: str) -> Iterator[int]:
    """``span``'s length, then each shorter end just before a separator, longest first."""
    yield len(span)
    for i in range(len(span) - 1, 0, -1):
        if span[i] in " -":
            yield i


def _iban_ok(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def _ibans(text: str, windows: Windows) -> Iterator[Hit]:
    for m in _in(_IBAN, text, windows.long):
        span = m.group()
        for end in _group_ends(span):
            if _iban_ok(span[:end]):
                yield Hit(m.start(), m.start() + end, "iban")
                break


def _phones(text: str, windows: Windows) -> Iterator[Hit]:
    for m in _in(_PHONE, text, windows.long):
        digits = sum(ch.isdigit() for ch in m.group())
        if 8 <= digits <= 15:
            yield Hit(m.start(), m.end(), "phone")


def _ips(text: str, windows: Windows) -> Iterator[Hit]:
    for m in _in(_IPV4, text, windows.dotted):
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        yield Hit(m.start(), m.end(), "ip")
    if ":" in text:
        for m in _in(_IPV6, text, _colon_windows(text)):
            candidate = m.group()
            if not any(ch.isdigit() for ch in candidate):  # "dead::beef" is an address, "Foo::Bar"-like code is not
                continue
            try:
                ipaddress.IPv6Address(candidate)
            except ValueError:
                continue
            yield Hit(m.start(), m.end(), "ip")


def _secrets(text: str, _windows: Windows) -> Iterator[Hit]:
    patterns = []
    if "-" in text:
        patterns += [p for literal, p in (("sk-", _SK), ("xox", _SLACK), ("glpat-", _GITLAB),
                                          ("-----BEGIN", _KEY_BLOCK)) if literal in text]
    if "_" in text and ("gh" in text):
        patterns.append(_GITHUB)
    if _AWS_GOOGLE_START.search(text):
        patterns.append(_AWS_GOOGLE)
    if "earer" in text or "EARER" in text:
        patterns.append(_BEARER)
    for pattern in patterns:
        for m in pattern.finditer(text):
            yield Hit(m.start(), m.end(), "secret")


_FINDERS: dict[str, Callable[[str, Windows], Iterator[Hit]]] = {
    "email": _emails, "phone": _phones, "card": _cards, "iban": _ibans, "ip": _ips, "secret": _secrets}
_NUMERIC = frozenset(("phone", "card", "iban", "ip"))


def find(text: str, kinds: Collection[str] = KINDS) -> list[Hit]:
    """The matches in ``text``, in order, none overlapping: where two overlap, the one that starts first wins,
    then the longer, then by kind (secret, email, card, iban, ip, phone)."""
    windows = numeric_windows(text) if not _NUMERIC.isdisjoint(kinds) else Windows([], [])
    hits = [hit for kind in kinds for hit in _FINDERS[kind](text, windows)]
    if len(hits) < 2:
        return hits
    hits.sort(key=lambda h: (h.start, h.start - h.end, _RANK[h.kind]))
    kept = [hits[0]]
    for hit in hits[1:]:
        if hit.start >= kept[-1].end:
            kept.append(hit)
    return kept


def replace(text: str, hits: list[Hit]) -> str:
    """``text`` with each hit replaced by its label."""
    out, at = [], 0
    for hit in hits:
        out += (text[at:hit.start], LABELS[hit.kind])
        at = hit.end
    out.append(text[at:])
    return "".join(out)


def redact(text: str, kinds: Collection[str] = KINDS) -> tuple[str, list[str]]:
    """``text`` redacted, and the kinds found (in order of first appearance, each once)."""
    hits = find(text, kinds)
    if not hits:
        return text, []
    return replace(text, hits), list(dict.fromkeys(hit.kind for hit in hits))


# ------------------------------------------------------------------------------------------ streams

# The longest match that may hold whitespace, except a bearer token and a private key block (handled on their
# own): an IBAN, 44 characters with its spaces; plus the few characters a pattern looks ahead.
_HOLD = 48
_CONTEXT = 2  # released characters kept, unsent again, for the patterns that look behind
_MAX_KEY_BLOCK = 16_384  # a private key block longer than this is not waited for
_MAX_PENDING = 8192  # a "word" longer than this (a base64 blob) is released anyway, minus _HOLD characters
_BEGIN = "-----BEGIN"


class StreamRedactor:
    """Redacts text that arrives in pieces, and gives the same result as redacting it whole.

    ``feed`` returns what can go out now: everything except the last _HOLD characters, widened to the start
    of the word they begin in (an e-mail address or a token has no bound on its length but holds no space),
    to a ``Bearer`` before that word, and to an unfinished private key block. ``finish`` returns the rest.
    """

    __slots__ = ("_context", "_kinds", "_pending", "found")

    def __init__(self, kinds: Collection[str] = KINDS) -> None:
        self._kinds = kinds
        self._context = ""
        self._pending = ""
        self.found: list[str] = []  # the kinds found so far, each once

    def feed(self, text: str) -> str:
        self._pending += text
        if len(self._pending) <= _HOLD:
            return ""
        buffer = self._context + self._pending
        hits = [h for h in find(buffer, self._kinds) if h.start >= len(self._context)]
        cut = self._cut(buffer, hits)
        if cut <= len(self._context):
            return ""
        released = [h for h in hits if h.end <= cut]
        out = replace(buffer[:cut], released)[len(self._context):] if released else buffer[len(self._context):cut]
        self._note(released)
        self._context = buffer[max(0, cut - _CONTEXT):cut]
        self._pending = buffer[cut:]
        return out

    def finish(self) -> str:
        """The text held back, redacted: the stream ended."""
        buffer = self._context + self._pending
        hits = [h for h in find(buffer, self._kinds) if h.start >= len(self._context)]
        self._note(hits)
        out = replace(buffer, hits)[len(self._context):] if hits else self._pending
        self._context = self._pending = ""
        return out

    def _note(self, hits: list[Hit]) -> None:
        for hit in hits:
            if hit.kind not in self.found:
                self.found.append(hit.kind)

    def _cut(self, buffer: str, hits: list[Hit]) -> int:
        """Where the text that can go out now ends (an index into ``buffer``)."""
        floor = len(self._context)
        cut = len(buffer) - _HOLD
        if len(buffer) - floor < _MAX_PENDING:
            while cut > floor and not buffer[cut - 1].isspace():  # back to the start of the word
                cut -= 1
            word_end = cut
            while word_end > floor and buffer[word_end - 1].isspace():
                word_end -= 1
            if buffer[max(floor, word_end - 6):word_end].lower() == "bearer":
                cut = word_end - 6
        if "secret" in self._kinds:
            begin = buffer.rfind(_BEGIN, floor)
            if begin != -1 and begin < cut and len(buffer) - begin < _MAX_KEY_BLOCK and not any(
                    h.start == begin for h in hits):
                cut = begin
        for hit in hits:  # a match that runs over the cut is held whole
            if hit.start < cut < hit.end:
                cut = hit.start
                break
        return cut
