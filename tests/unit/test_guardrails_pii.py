"""The pii guardrail's detection (true and false positives) and its stream redactor."""

import random

import pytest

from appliance.guardrails import pii


def kinds_in(text: str) -> list[str]:
    return [hit.kind for hit in pii.find(text)]


@pytest.mark.parametrize(("text", "kind"), [
    ("write to jane.doe+tag@example.co.uk today", "email"),
    ("call +44 20 7946 0958 now", "phone"),
    ("call (555) 123-4567 now", "phone"),
    ("call 555-123-4567.", "phone"),
    ("card 4111 1111 1111 1111 ok", "card"),
    ("card 4111-1111-1111-1111", "card"),
    ("amex 378282246310005", "card"),
    ("iban DE89 3704 0044 0532 0130 00 please", "iban"),
    ("iban GB82WEST12345698765432", "iban"),
    ("server 192.168.1.10.", "ip"),
    ("host fe80::1 and more", "ip"),
    ("loopback ::1 here", "ip"),
    ("full 2001:db8:85a3::8a2e:370:7334 addr", "ip"),
    ("key sk-proj-abcdefghijklmnopqrstuvwxyz123456", "secret"),
    ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789", "secret"),
    ("aws AKIAIOSFODNN7EXAMPLE", "secret"),
    ("slack xoxb-1234567890-abcdefghij", "secret"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "secret"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----", "secret"),
])
def test_finds_each_kind(text: str, kind: str) -> None:
    assert kinds_in(text) == [kind]


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112 fails the Luhn check",
    "order number 1234567890123",  # thirteen digits, not Luhn-valid
    "iban DE89 3704 0044 0532 0130 99 has a bad checksum",
    "version 1.2.3 and v1.2.3.4 and Python 3.11.4 are no addresses",
    "999.1.1.1 is not an address and neither is 1.2.3.4.5",
    "the time is 12:30:45 and std::vector is code",
    "mac 00:1a:2b:3c:4d:5e",
    "dates 2024-01-02, amounts 1,234,567 and pi 3.14159",
    "an @mention and user@localhost",
    "sk-short and a Bearer token",
    "ask-abcdefghijklmnopqrstuvwxyz is part of a word",
])
def test_leaves_lookalikes_alone(text: str) -> None:
    assert kinds_in(text) == []


def test_redacts_with_labels_and_names_the_kinds() -> None:
    text, found = pii.redact("mail bob@example.com, card 4111111111111111, bob@example.com again")
    assert text == "mail [EMAIL], card [CARD], [EMAIL] again"
    assert found == ["email", "card"]


def test_only_the_kinds_asked_for() -> None:
    assert pii.redact("bob@example.com 10.0.0.1", ["ip"]) == ("bob@example.com [IP]", ["ip"])


SAMPLES = [
    "Contact bob.smith+x@example.co.uk or call +1 (555) 123-4567 / 555-123-4567. Card 4111 1111 1111 1111, bad "
    "4111 1111 1111 1112.\nIBAN DE89 3704 0044 0532 0130 00 and GB82WEST12345698765432. IP 192.168.1.10, v1.2.3.4, "
    "fe80::1 and 12:30:45.\nkey sk-proj-abcdefghijklmnopqrstuvwxyz123456 AKIAIOSFODNN7EXAMPLE\n"
    "Authorization: Bearer    eyJhbGciOiJIUzI1NiJ9.abc.defghijklmnop\n-----BEGIN PRIVATE KEY-----\n"
    + "A" * 300 + "\n-----END PRIVATE KEY-----\nthat is all.",
    "no personal data at all, just words " * 10,
    "x@y.io" + " word" * 30 + " " + "a" * 200 + "@example.com tail",
    "digits 4111111111111111" + "1" * 5 + " 4111 1111 1111 1111 12 end",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_fed_one_character_at_a_time_equals_whole_text(text: str) -> None:
    redactor = pii.StreamRedactor()
    out = "".join(redactor.feed(ch) for ch in text) + redactor.finish()
    whole, found = pii.redact(text)
    assert out == whole
    assert redactor.found == found or set(redactor.found) == set(found)


@pytest.mark.parametrize("seed", range(40))
def test_stream_in_random_splits_equals_whole_text(seed: int) -> None:
    rng = random.Random(seed)
    text = rng.choice(SAMPLES)
    redactor = pii.StreamRedactor()
    out, at = [], 0
    while at < len(text):
        size = rng.randint(1, 40)
        out.append(redactor.feed(text[at:at + size]))
        at += size
    out.append(redactor.finish())
    assert "".join(out) == pii.redact(text)[0]


def test_stream_holds_back_little() -> None:
    redactor = pii.StreamRedactor()
    released = redactor.feed("plain words " * 20)
    assert len(released) >= 240 - 60  # only the last few dozen characters wait
    assert redactor.feed("") == ""
    assert released + redactor.finish() == "plain words " * 20
